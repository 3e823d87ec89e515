#include "client/host_tensor.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace anchorserve {

absl::StatusOr<int64_t> TensorByteCount(absl::string_view name, DType dtype,
                                        absl::Span<const int64_t> shape) {
  if (shape.size() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ".shape must have 3 dims, got ", shape.size()));
  }
  int64_t count = static_cast<int64_t>(ElementSize(dtype));
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ".shape[", i, "] must be positive, got ", shape[i]));
    }
    if (count > std::numeric_limits<int64_t>::max() / shape[i]) {
      return absl::InvalidArgumentError(absl::StrCat(name, ".shape [", absl::StrJoin(shape, ", "),
                                                     "] has more bytes than fit in int64"));
    }
    count *= shape[i];
  }
  return count;
}

absl::StatusOr<HostTensor> AllocateHostTensor(DType dtype, Layout layout,
                                              std::array<int64_t, 3> shape) {
  absl::StatusOr<int64_t> bytes = TensorByteCount("tensor", dtype, shape);
  if (!bytes.ok()) return bytes.status();
  HostTensor tensor;
  tensor.dtype = dtype;
  tensor.layout = layout;
  tensor.shape = shape;
  tensor.bytes.resize(static_cast<size_t>(*bytes));
  return tensor;
}

absl::Status ValidateTensorView(absl::string_view name, const TensorView& view) {
  absl::StatusOr<int64_t> expected = TensorByteCount(name, view.dtype, view.shape);
  if (!expected.ok()) return expected.status();
  if (static_cast<int64_t>(view.bytes.size()) != *expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, " has ", view.bytes.size(), " bytes, expected ", *expected, " for shape [",
        absl::StrJoin(view.shape, ", "), "] ", std::string(DTypeName(view.dtype))));
  }
  return absl::OkStatus();
}

absl::StatusOr<AttentionShape> ValidateQkv(const TensorView& q, const TensorView& k,
                                           const TensorView& v) {
  for (const auto& [name, view] :
       {std::pair<const char*, const TensorView*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    absl::Status status = ValidateTensorView(name, *view);
    if (!status.ok()) return status;
  }
  if (k.dtype != q.dtype || v.dtype != q.dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat("q, k and v must share one dtype, got ", std::string(DTypeName(q.dtype)), ", ",
                     std::string(DTypeName(k.dtype)), ", ", std::string(DTypeName(v.dtype))));
  }
  if (k.layout != q.layout || v.layout != q.layout) {
    return absl::InvalidArgumentError("q, k and v must share one layout");
  }
  if (k.shape != v.shape) {
    return absl::InvalidArgumentError(absl::StrCat("k.shape [", absl::StrJoin(k.shape, ", "),
                                                   "] and v.shape [", absl::StrJoin(v.shape, ", "),
                                                   "] differ"));
  }
  if (k.SeqLen() != q.SeqLen()) {
    return absl::InvalidArgumentError(absl::StrCat("k has seq_len ", k.SeqLen(), " but q has ",
                                                   q.SeqLen(), " (causal prefill needs equal)"));
  }
  if (k.HeadDim() != q.HeadDim()) {
    return absl::InvalidArgumentError(
        absl::StrCat("k has head_dim ", k.HeadDim(), " but q has ", q.HeadDim()));
  }
  if (q.NumHeads() % k.NumHeads() != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "q heads (", q.NumHeads(), ") must be a multiple of k heads (", k.NumHeads(), ")"));
  }
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

v1::DataType ToProto(DType dtype) {
  switch (dtype) {
    case DType::kBf16:
      return v1::DATA_TYPE_BF16;
    case DType::kFp16:
      return v1::DATA_TYPE_FP16;
    case DType::kFp32:
      return v1::DATA_TYPE_FP32;
  }
  return v1::DATA_TYPE_UNSPECIFIED;
}

v1::TensorLayout ToProto(Layout layout) {
  return layout == Layout::kTokenMajor ? v1::TENSOR_LAYOUT_TOKEN_MAJOR
                                       : v1::TENSOR_LAYOUT_HEAD_MAJOR;
}

absl::StatusOr<DType> DTypeFromProto(v1::DataType dtype) {
  switch (dtype) {
    case v1::DATA_TYPE_BF16:
      return DType::kBf16;
    case v1::DATA_TYPE_FP16:
      return DType::kFp16;
    case v1::DATA_TYPE_FP32:
      return DType::kFp32;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", static_cast<int>(dtype)));
  }
}

absl::StatusOr<Layout> LayoutFromProto(v1::TensorLayout layout) {
  switch (layout) {
    case v1::TENSOR_LAYOUT_TOKEN_MAJOR:
      return Layout::kTokenMajor;
    case v1::TENSOR_LAYOUT_HEAD_MAJOR:
      return Layout::kHeadMajor;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown layout ", static_cast<int>(layout)));
  }
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
  spec->set_dtype(ToProto(view.dtype));
  spec->set_layout(ToProto(view.layout));
  spec->clear_shape();
  for (int64_t dim : view.shape) spec->add_shape(dim);
}

void SetTensor(const TensorView& view, v1::Tensor* tensor) {
  tensor->set_dtype(ToProto(view.dtype));
  tensor->set_layout(ToProto(view.layout));
  tensor->clear_shape();
  for (int64_t dim : view.shape) tensor->add_shape(dim);
  tensor->set_data(reinterpret_cast<const char*>(view.bytes.data()), view.bytes.size());
}

absl::StatusOr<HostTensor> HostTensorFromProto(absl::string_view name, const v1::Tensor& tensor) {
  absl::StatusOr<DType> dtype = DTypeFromProto(tensor.dtype());
  if (!dtype.ok())
    return absl::InvalidArgumentError(absl::StrCat(name, ".dtype: ", dtype.status().message()));
  absl::StatusOr<Layout> layout = LayoutFromProto(tensor.layout());
  if (!layout.ok())
    return absl::InvalidArgumentError(absl::StrCat(name, ".layout: ", layout.status().message()));
  if (tensor.shape_size() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ".shape must have 3 dims, got ", tensor.shape_size()));
  }
  HostTensor host;
  host.dtype = *dtype;
  host.layout = *layout;
  for (int i = 0; i < 3; ++i) host.shape[i] = tensor.shape(i);
  absl::StatusOr<int64_t> expected = TensorByteCount(name, host.dtype, host.shape);
  if (!expected.ok()) return expected.status();
  if (static_cast<int64_t>(tensor.data().size()) != *expected) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ".data has ", tensor.data().size(), " bytes, expected ", *expected));
  }
  host.bytes.assign(tensor.data().begin(), tensor.data().end());
  return host;
}

absl::StatusOr<AnchorConfig> AnchorConfigFromProto(const v1::AnchorConfig& proto,
                                                   const AnchorConfig& defaults) {
  AnchorConfig config = defaults;
  switch (proto.mode()) {
    case v1::ATTENTION_MODE_UNSPECIFIED:
    case v1::ATTENTION_MODE_ANCHOR:
      config.mode = AttentionMode::kAnchor;
      break;
    case v1::ATTENTION_MODE_DENSE:
      config.mode = AttentionMode::kDense;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("config.mode: unknown mode ", static_cast<int>(proto.mode())));
  }
  if (proto.has_theta()) config.theta = static_cast<float>(proto.theta());
  if (proto.has_block_size()) config.block_size = proto.block_size();
  if (proto.has_step()) config.step = proto.step();
  if (proto.has_init_groups()) config.init_groups = proto.init_groups();
  if (proto.has_local_groups()) config.local_groups = proto.local_groups();
  if (proto.has_softmax_scale()) config.softmax_scale = static_cast<float>(proto.softmax_scale());
  absl::Status status = ValidateAnchorConfig(config);
  if (!status.ok()) return status;
  return config;
}

}  // namespace anchorserve
