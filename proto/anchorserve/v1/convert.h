// Pure conversions between the anchorserve.v1 messages and the core types, shared by the server
// (which validates requests with them) and the client (which builds requests and reads
// responses). No limits and no flags here: those are the server's (server/proto_convert.h).
// Every error is INVALID_ARGUMENT and names the offending field, e.g.
// "q.shape[1] (num_heads) must be positive, got 0".
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "anchorserve/v1/anchorserve.pb.h"
#include "kernels/attention_types.h"
#include "kernels/dtype.h"

namespace anchorserve {

v1::DataType DTypeToProto(DType dtype);
v1::TensorLayout LayoutToProto(Layout layout);

// `field` names the proto field in the error, e.g. "q.dtype". Unset and unknown values fail.
absl::StatusOr<DType> DTypeFromProto(absl::string_view field, int value);
absl::StatusOr<Layout> LayoutFromProto(absl::string_view field, int value);

// DTypeName as absl::string_view: kernels/ speaks std::string_view, and absl 20220623's StrCat
// wants absl::string_view.
absl::string_view DTypeText(DType dtype);

// "[8, 4, 16]".
std::string DimsText(absl::Span<const int64_t> dims);

// One tensor's description (a v1::Tensor, a v1::TensorSpec or a client-side view), checked on its
// own: 3 positive dims and element and byte counts that fit int64.
struct TensorGeometry {
  std::string name;  // "q", "k", "v", "output": prefixes the fields in errors
  DType dtype = DType::kBf16;
  Layout layout = Layout::kTokenMajor;
  std::vector<int64_t> dims;  // [seq_len, num_heads, head_dim] or [num_heads, seq_len, head_dim]
  int seq_axis = 0;           // index of seq_len in `dims`
  int heads_axis = 1;         // index of num_heads in `dims`
  int64_t elements = 0;
  int64_t bytes = 0;

  int64_t seq_len() const { return dims[seq_axis]; }
  int64_t num_heads() const { return dims[heads_axis]; }
  int64_t head_dim() const { return dims[2]; }
  // "q.shape[1] (num_heads)": the dim's field and what it means in this layout.
  std::string AxisField(int axis) const;
};

absl::StatusOr<TensorGeometry> MakeTensorGeometry(absl::string_view name, DType dtype,
                                                  Layout layout, absl::Span<const int64_t> dims);
// The same from a proto's dtype, layout and shape fields (enums as sent, unknown values included).
absl::StatusOr<TensorGeometry> TensorGeometryFromProto(absl::string_view name, int dtype,
                                                       int layout, absl::Span<const int64_t> dims);

// INVALID_ARGUMENT unless `byte_count` is what `geometry` needs; `what` names the data in the
// error ("q.data" for a proto, "q" for a view).
absl::Status CheckByteCount(absl::string_view what, const TensorGeometry& geometry,
                            int64_t byte_count);

// Q, K and V of one causal prefill: k and v have q's dtype, layout, seq_len and head_dim, v the
// shape of k, and q's heads are a multiple of k's.
absl::Status CheckQkvGeometry(const TensorGeometry& q, const TensorGeometry& k,
                              const TensorGeometry& v);

// dtype, layout and shape fields of a message describing a tensor (data is left alone).
void SetTensorSpec(DType dtype, Layout layout, absl::Span<const int64_t> dims,
                   v1::TensorSpec* spec);
void SetTensorSpec(DType dtype, Layout layout, absl::Span<const int64_t> dims, v1::Tensor* tensor);

// Core config from a proto config; unset fields keep the values of `defaults`. INVALID_ARGUMENT
// names config.<field>.
absl::StatusOr<AnchorConfig> AnchorConfigFromProto(const v1::AnchorConfig& proto,
                                                   const AnchorConfig& defaults = AnchorConfig());

// Every field set. softmax_scale 0 means 1/sqrt(head_dim).
v1::AnchorConfig AnchorConfigToProto(const AnchorConfig& config);

}  // namespace anchorserve
