// Host-side tensors of the client, and their conversions to and from the v1 protos (built on the
// shared conversions of proto/anchorserve/v1/convert.h).
#pragma once

#include <array>
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
#include "proto/anchorserve/v1/convert.h"

namespace anchorserve {

// A tensor of one sequence in memory the caller owns; nothing is copied until it is sent.
struct TensorView {
  DType dtype = DType::kBf16;
  Layout layout = Layout::kTokenMajor;
  std::array<int64_t, 3> shape{};  // [seq_len, heads, head_dim] or [heads, seq_len, head_dim]
  absl::Span<const uint8_t> bytes;

  int64_t SeqLen() const { return layout == Layout::kTokenMajor ? shape[0] : shape[1]; }
  int64_t NumHeads() const { return layout == Layout::kTokenMajor ? shape[1] : shape[0]; }
  int64_t HeadDim() const { return shape[2]; }
};

// An owned host tensor: what the client returns and what .npy files load into.
struct HostTensor {
  DType dtype = DType::kBf16;
  Layout layout = Layout::kTokenMajor;
  std::array<int64_t, 3> shape{};  // ordered as `layout` says
  std::vector<uint8_t> bytes;      // product(shape) * ElementSize(dtype)

  TensorView View() const { return TensorView{dtype, layout, shape, bytes}; }
  int64_t NumElements() const { return shape[0] * shape[1] * shape[2]; }
};

// A tensor of `shape` filled with zero bytes. Fails when the size overflows.
absl::StatusOr<HostTensor> AllocateHostTensor(DType dtype, Layout layout,
                                              std::array<int64_t, 3> shape);

// Checks that `view` has positive dims and exactly the bytes its shape needs; errors name `name`.
absl::StatusOr<TensorGeometry> ViewGeometry(absl::string_view name, const TensorView& view);

// Checks that Q, K and V describe one causal prefill: same dtype, layout, seq_len and head_dim,
// and num_q_heads a multiple of num_kv_heads. Returns the shape.
absl::StatusOr<AttentionShape> ValidateQkv(const TensorView& q, const TensorView& k,
                                           const TensorView& v);

// Layout-ordered shape of a [seq_len, heads, head_dim] tensor.
std::array<int64_t, 3> ShapeFor(Layout layout, int64_t seq_len, int64_t heads, int64_t head_dim);

// "bf16" | "fp16" | "fp32" and "token" | "head", as the CLI spells them.
absl::StatusOr<DType> ParseDType(absl::string_view name);
absl::StatusOr<Layout> ParseLayout(absl::string_view name);
absl::string_view LayoutName(Layout layout);

// Fills the proto's spec fields (dtype, shape, layout) from a view.
void SetSpec(const TensorView& view, v1::TensorSpec* spec);
// A tensor proto holding a copy of the view's bytes.
void SetTensor(const TensorView& view, v1::Tensor* tensor);

// The owned tensor a response's output proto describes; checks its byte count.
absl::StatusOr<HostTensor> HostTensorFromProto(absl::string_view name, const v1::Tensor& tensor);

}  // namespace anchorserve
