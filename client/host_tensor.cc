#include "client/host_tensor.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/status_macros.h"

namespace anchorserve {

absl::StatusOr<HostTensor> AllocateHostTensor(DType dtype, Layout layout,
                                              std::array<int64_t, 3> shape) {
  ANCHOR_ASSIGN_OR_RETURN(const TensorGeometry geometry,
                          MakeTensorGeometry("tensor", dtype, layout, shape));
  HostTensor tensor;
  tensor.dtype = dtype;
  tensor.layout = layout;
  tensor.shape = shape;
  tensor.bytes.resize(static_cast<size_t>(geometry.bytes));
  return tensor;
}

absl::StatusOr<TensorGeometry> ViewGeometry(absl::string_view name, const TensorView& view) {
  ANCHOR_ASSIGN_OR_RETURN(TensorGeometry geometry,
                          MakeTensorGeometry(name, view.dtype, view.layout, view.shape));
  ANCHOR_RETURN_IF_ERROR(CheckByteCount(name, geometry, static_cast<int64_t>(view.bytes.size())));
  return geometry;
}

absl::StatusOr<AttentionShape> ValidateQkv(const TensorView& q, const TensorView& k,
                                           const TensorView& v) {
  ANCHOR_ASSIGN_OR_RETURN(const TensorGeometry q_geometry, ViewGeometry("q", q));
  ANCHOR_ASSIGN_OR_RETURN(const TensorGeometry k_geometry, ViewGeometry("k", k));
  ANCHOR_ASSIGN_OR_RETURN(const TensorGeometry v_geometry, ViewGeometry("v", v));
  ANCHOR_RETURN_IF_ERROR(CheckQkvGeometry(q_geometry, k_geometry, v_geometry));
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (q.NumHeads() > kIntMax || q.HeadDim() > kIntMax) {
    return absl::InvalidArgumentError("q heads and head_dim must fit in int32");
  }
  AttentionShape shape;
  shape.seq_len = q.SeqLen();
  shape.num_q_heads = static_cast<int>(q.NumHeads());
  shape.num_kv_heads = static_cast<int>(k.NumHeads());
  shape.head_dim = static_cast<int>(q.HeadDim());
  return shape;
}

std::array<int64_t, 3> ShapeFor(Layout layout, int64_t seq_len, int64_t heads, int64_t head_dim) {
  if (layout == Layout::kTokenMajor) return {seq_len, heads, head_dim};
  return {heads, seq_len, head_dim};
}

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  if (name == "bf16") return DType::kBf16;
  if (name == "fp16") return DType::kFp16;
  if (name == "fp32") return DType::kFp32;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype '", name, "' (expected bf16, fp16 or fp32)"));
}

absl::StatusOr<Layout> ParseLayout(absl::string_view name) {
  if (name == "token") return Layout::kTokenMajor;
  if (name == "head") return Layout::kHeadMajor;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown layout '", name, "' (expected token or head)"));
}

absl::string_view LayoutName(Layout layout) {
  return layout == Layout::kTokenMajor ? "token" : "head";
}

void SetSpec(const TensorView& view, v1::TensorSpec* spec) {
  SetTensorSpec(view.dtype, view.layout, view.shape, spec);
}

void SetTensor(const TensorView& view, v1::Tensor* tensor) {
  SetTensorSpec(view.dtype, view.layout, view.shape, tensor);
  tensor->set_data(reinterpret_cast<const char*>(view.bytes.data()), view.bytes.size());
}

absl::StatusOr<HostTensor> HostTensorFromProto(absl::string_view name, const v1::Tensor& tensor) {
  ANCHOR_ASSIGN_OR_RETURN(
      const TensorGeometry geometry,
      TensorGeometryFromProto(name, tensor.dtype(), tensor.layout(), tensor.shape()));
  ANCHOR_RETURN_IF_ERROR(CheckByteCount(absl::StrCat(name, ".data"), geometry,
                                        static_cast<int64_t>(tensor.data().size())));
  HostTensor host;
  host.dtype = geometry.dtype;
  host.layout = geometry.layout;
  std::copy(geometry.dims.begin(), geometry.dims.end(), host.shape.begin());
  host.bytes.assign(tensor.data().begin(), tensor.data().end());
  return host;
}

}  // namespace anchorserve
