#include "proto/anchorserve/v1/convert.h"

#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/descriptor.h"
#include "kernels/status_macros.h"

namespace anchorserve {
namespace {

// "DATA_TYPE_FP16", or "unknown value 99" for a number the enum does not define.
std::string EnumValueText(const google::protobuf::EnumDescriptor* descriptor, int value) {
  const google::protobuf::EnumValueDescriptor* named = descriptor->FindValueByNumber(value);
  return named != nullptr ? named->name() : absl::StrCat("unknown value ", value);
}

// v1::Tensor and v1::TensorSpec share these fields.
template <typename Message>
void SetSpecFields(DType dtype, Layout layout, absl::Span<const int64_t> dims, Message* message) {
  message->set_dtype(DTypeToProto(dtype));
  message->set_layout(LayoutToProto(layout));
  message->clear_shape();
  for (int64_t dim : dims) message->add_shape(dim);
}

// k or v against q.
absl::Status CheckMatchesQ(const TensorGeometry& q, const TensorGeometry& t) {
  if (t.dtype != q.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(t.name, ".dtype (", DTypeText(t.dtype),
                                                   ") must equal ", q.name, ".dtype (",
                                                   DTypeText(q.dtype), ")"));
  }
  if (t.layout != q.layout) {
    return absl::InvalidArgumentError(absl::StrCat(
        t.name, ".layout (", v1::TensorLayout_Name(LayoutToProto(t.layout)), ") must equal ",
        q.name, ".layout (", v1::TensorLayout_Name(LayoutToProto(q.layout)), ")"));
  }
  if (t.seq_len() != q.seq_len()) {
    return absl::InvalidArgumentError(absl::StrCat(
        t.AxisField(t.seq_axis), " = ", t.seq_len(), " must equal ", q.AxisField(q.seq_axis), " = ",
        q.seq_len(), " (causal prefill: kv_len == q_len)"));
  }
  if (t.head_dim() != q.head_dim()) {
    return absl::InvalidArgumentError(absl::StrCat(
        t.AxisField(2), " = ", t.head_dim(), " must equal ", q.AxisField(2), " = ", q.head_dim()));
  }
  return absl::OkStatus();
}

}  // namespace

v1::DataType DTypeToProto(DType dtype) {
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

v1::TensorLayout LayoutToProto(Layout layout) {
  switch (layout) {
    case Layout::kTokenMajor:
      return v1::TENSOR_LAYOUT_TOKEN_MAJOR;
    case Layout::kHeadMajor:
      return v1::TENSOR_LAYOUT_HEAD_MAJOR;
  }
  return v1::TENSOR_LAYOUT_UNSPECIFIED;
}

absl::StatusOr<DType> DTypeFromProto(absl::string_view field, int value) {
  switch (value) {
    case v1::DATA_TYPE_BF16:
      return DType::kBf16;
    case v1::DATA_TYPE_FP16:
      return DType::kFp16;
    case v1::DATA_TYPE_FP32:
      return DType::kFp32;
    default:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(field, " must be DATA_TYPE_BF16, DATA_TYPE_FP16 or DATA_TYPE_FP32, got ",
                   EnumValueText(v1::DataType_descriptor(), value)));
}

absl::StatusOr<Layout> LayoutFromProto(absl::string_view field, int value) {
  switch (value) {
    case v1::TENSOR_LAYOUT_TOKEN_MAJOR:
      return Layout::kTokenMajor;
    case v1::TENSOR_LAYOUT_HEAD_MAJOR:
      return Layout::kHeadMajor;
    default:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(field, " must be TENSOR_LAYOUT_TOKEN_MAJOR or TENSOR_LAYOUT_HEAD_MAJOR, got ",
                   EnumValueText(v1::TensorLayout_descriptor(), value)));
}

absl::string_view DTypeText(DType dtype) {
  const std::string_view name = DTypeName(dtype);
  return absl::string_view(name.data(), name.size());
}

std::string DimsText(absl::Span<const int64_t> dims) {
  return absl::StrCat("[", absl::StrJoin(dims, ", "), "]");
}

std::string TensorGeometry::AxisField(int axis) const {
  const char* meaning = "head_dim";
  if (axis == seq_axis) meaning = "seq_len";
  if (axis == heads_axis) meaning = "num_heads";
  return absl::StrCat(name, ".shape[", axis, "] (", meaning, ")");
}

absl::StatusOr<TensorGeometry> MakeTensorGeometry(absl::string_view name, DType dtype,
                                                  Layout layout, absl::Span<const int64_t> dims) {
  TensorGeometry g;
  g.name = std::string(name);
  g.dtype = dtype;
  g.layout = layout;
  const bool token_major = layout == Layout::kTokenMajor;
  g.seq_axis = token_major ? 0 : 1;
  g.heads_axis = token_major ? 1 : 0;
  if (dims.size() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ".shape must have 3 dims ",
                     token_major ? "[seq_len, num_heads, head_dim] for TENSOR_LAYOUT_TOKEN_MAJOR"
                                 : "[num_heads, seq_len, head_dim] for TENSOR_LAYOUT_HEAD_MAJOR",
                     ", got ", dims.size(), " ", DimsText(dims)));
  }
  g.dims.assign(dims.begin(), dims.end());
  for (int axis = 0; axis < 3; ++axis) {
    if (g.dims[axis] <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(g.AxisField(axis), " must be positive, got ", g.dims[axis]));
    }
  }
  int64_t elements = 1;
  for (int64_t dim : g.dims) {
    if (__builtin_mul_overflow(elements, dim, &elements)) {
      return absl::InvalidArgumentError(absl::StrCat(name, ".shape ", DimsText(g.dims),
                                                     " has more elements than int64 can count"));
    }
  }
  int64_t bytes = 0;
  if (__builtin_mul_overflow(elements, static_cast<int64_t>(ElementSize(dtype)), &bytes)) {
    return absl::InvalidArgumentError(absl::StrCat(name, ".shape ", DimsText(g.dims), " ",
                                                   DTypeText(dtype),
                                                   " has more bytes than int64 can count"));
  }
  g.elements = elements;
  g.bytes = bytes;
  return g;
}

absl::StatusOr<TensorGeometry> TensorGeometryFromProto(absl::string_view name, int dtype,
                                                       int layout, absl::Span<const int64_t> dims) {
  ANCHOR_ASSIGN_OR_RETURN(const DType core_dtype,
                          DTypeFromProto(absl::StrCat(name, ".dtype"), dtype));
  ANCHOR_ASSIGN_OR_RETURN(const Layout core_layout,
                          LayoutFromProto(absl::StrCat(name, ".layout"), layout));
  return MakeTensorGeometry(name, core_dtype, core_layout, dims);
}

absl::Status CheckByteCount(absl::string_view what, const TensorGeometry& geometry,
                            int64_t byte_count) {
  if (byte_count != geometry.bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has ", byte_count, " bytes, expected ", geometry.bytes, " for shape ",
                     DimsText(geometry.dims), " ", DTypeText(geometry.dtype)));
  }
  return absl::OkStatus();
}

absl::Status CheckQkvGeometry(const TensorGeometry& q, const TensorGeometry& k,
                              const TensorGeometry& v) {
  ANCHOR_RETURN_IF_ERROR(CheckMatchesQ(q, k));
  ANCHOR_RETURN_IF_ERROR(CheckMatchesQ(q, v));
  if (v.dims != k.dims) {
    return absl::InvalidArgumentError(absl::StrCat(
        v.name, ".shape ", DimsText(v.dims), " must equal ", k.name, ".shape ", DimsText(k.dims)));
  }
  if (q.num_heads() % k.num_heads() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(q.AxisField(q.heads_axis), " = ", q.num_heads(), " must be a multiple of ",
                     k.AxisField(k.heads_axis), " = ", k.num_heads()));
  }
  return absl::OkStatus();
}

void SetTensorSpec(DType dtype, Layout layout, absl::Span<const int64_t> dims,
                   v1::TensorSpec* spec) {
  SetSpecFields(dtype, layout, dims, spec);
}

void SetTensorSpec(DType dtype, Layout layout, absl::Span<const int64_t> dims, v1::Tensor* tensor) {
  SetSpecFields(dtype, layout, dims, tensor);
}

absl::StatusOr<AnchorConfig> AnchorConfigFromProto(const v1::AnchorConfig& proto,
                                                   const AnchorConfig& defaults) {
  AnchorConfig config = defaults;
  switch (proto.mode()) {
    case v1::ATTENTION_MODE_UNSPECIFIED:
      break;  // the defaults' mode
    case v1::ATTENTION_MODE_ANCHOR:
      config.mode = AttentionMode::kAnchor;
      break;
    case v1::ATTENTION_MODE_DENSE:
      config.mode = AttentionMode::kDense;
      break;
    case v1::ATTENTION_MODE_AUTO:
      config.mode = AttentionMode::kAuto;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("config.mode must be ATTENTION_MODE_ANCHOR, ATTENTION_MODE_DENSE or "
                       "ATTENTION_MODE_AUTO, got unknown value ",
                       static_cast<int>(proto.mode())));
  }
  if (proto.has_theta()) {
    if (std::isnan(proto.theta())) {
      return absl::InvalidArgumentError("config.theta must not be NaN (+inf = dense is allowed)");
    }
    // Beyond float range is beyond any score difference: it saturates to +-inf.
    config.theta = static_cast<float>(proto.theta());
  }
  if (proto.has_block_size()) config.block_size = proto.block_size();
  if (proto.has_step()) config.step = proto.step();
  if (proto.has_init_groups()) config.init_groups = proto.init_groups();
  if (proto.has_local_groups()) config.local_groups = proto.local_groups();
  if (proto.has_softmax_scale()) {
    const double scale = proto.softmax_scale();
    if (!std::isfinite(scale) || scale < 0 || scale > std::numeric_limits<float>::max()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "config.softmax_scale must be finite and >= 0 (0 = 1/sqrt(head_dim)), got ", scale));
    }
    config.softmax_scale = static_cast<float>(scale);
  }
  // NaN gets its own message here; ranges are ValidateAnchorConfig's (values beyond float range
  // saturate to +-inf and are refused there).
  const struct {
    bool has;
    double value;
    const char* field;
    float* target;
  } mass_fields[] = {
      {proto.has_mass_target(), proto.mass_target(), "config.mass_target", &config.mass_target},
      {proto.has_mass_density_cap(), proto.mass_density_cap(), "config.mass_density_cap",
       &config.mass_density_cap},
      {proto.has_mass_min_theta(), proto.mass_min_theta(), "config.mass_min_theta",
       &config.mass_min_theta},
  };
  for (const auto& field : mass_fields) {
    if (!field.has) continue;
    if (std::isnan(field.value)) {
      return absl::InvalidArgumentError(absl::StrCat(field.field, " must not be NaN"));
    }
    *field.target = static_cast<float>(field.value);
    // A value that rounds to 0 (mass targets off) or onto a bound in float is not what was
    // asked for: the fraction fields are checked on the double as sent.
    const bool fraction = field.target != &config.mass_min_theta;
    if (fraction && field.value != 0.0 && (field.value < 1e-6 || field.value > 1.0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(field.field, " must be 0 or in [1e-6, 1], got ", field.value));
    }
  }
  ANCHOR_RETURN_IF_ERROR(ValidateAnchorConfig(config));
  return config;
}

v1::AnchorConfig AnchorConfigToProto(const AnchorConfig& config) {
  v1::AnchorConfig proto;
  switch (config.mode) {
    case AttentionMode::kAnchor:
      proto.set_mode(v1::ATTENTION_MODE_ANCHOR);
      break;
    case AttentionMode::kDense:
      proto.set_mode(v1::ATTENTION_MODE_DENSE);
      break;
    case AttentionMode::kAuto:
      proto.set_mode(v1::ATTENTION_MODE_AUTO);
      break;
  }
  proto.set_theta(config.theta);
  proto.set_block_size(config.block_size);
  proto.set_step(config.step);
  proto.set_init_groups(config.init_groups);
  proto.set_local_groups(config.local_groups);
  proto.set_softmax_scale(config.softmax_scale);
  proto.set_mass_target(config.mass_target);
  proto.set_mass_density_cap(config.mass_density_cap);
  proto.set_mass_min_theta(config.mass_min_theta);
  return proto;
}

}  // namespace anchorserve
