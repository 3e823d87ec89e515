#include "server/proto_convert.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/status_macros.h"

namespace anchorserve {
namespace {

// A tensor's description (Tensor or TensorSpec), checked on its own.
struct TensorGeometry {
  DType dtype = DType::kBf16;
  Layout layout = Layout::kTokenMajor;
  std::vector<int64_t> dims;
  int seq_axis = 0;    // index of seq_len in `dims`
  int heads_axis = 1;  // index of num_heads in `dims`
  int64_t elements = 0;
  int64_t bytes = 0;

  int64_t seq_len() const { return dims[seq_axis]; }
  int64_t num_heads() const { return dims[heads_axis]; }
  int64_t head_dim() const { return dims[2]; }
};

// kernels/ speaks std::string_view; absl 20220623's StrCat wants absl::string_view.
absl::string_view DTypeText(DType dtype) {
  const std::string_view name = DTypeName(dtype);
  return absl::string_view(name.data(), name.size());
}

std::string DimsString(absl::Span<const int64_t> dims) {
  return absl::StrCat("[", absl::StrJoin(dims, ", "), "]");
}

std::string AxisName(absl::string_view tensor, int axis, absl::string_view meaning) {
  return absl::StrCat(tensor, ".shape[", axis, "] (", meaning, ")");
}

absl::StatusOr<DType> DTypeFromProto(absl::string_view tensor, int value) {
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
  const std::string got = v1::DataType_IsValid(value)
                              ? std::string(v1::DataType_Name(static_cast<v1::DataType>(value)))
                              : absl::StrCat("unknown value ", value);
  return absl::InvalidArgumentError(absl::StrCat(
      tensor, ".dtype must be DATA_TYPE_BF16, DATA_TYPE_FP16 or DATA_TYPE_FP32, got ", got));
}

absl::StatusOr<Layout> LayoutFromProto(absl::string_view tensor, int value) {
  switch (value) {
    case v1::TENSOR_LAYOUT_TOKEN_MAJOR:
      return Layout::kTokenMajor;
    case v1::TENSOR_LAYOUT_HEAD_MAJOR:
      return Layout::kHeadMajor;
    default:
      break;
  }
  const std::string got =
      v1::TensorLayout_IsValid(value)
          ? std::string(v1::TensorLayout_Name(static_cast<v1::TensorLayout>(value)))
          : absl::StrCat("unknown value ", value);
  return absl::InvalidArgumentError(absl::StrCat(
      tensor, ".layout must be TENSOR_LAYOUT_TOKEN_MAJOR or TENSOR_LAYOUT_HEAD_MAJOR, got ", got));
}

absl::StatusOr<TensorGeometry> ParseTensor(absl::string_view tensor, int dtype, int layout,
                                           absl::Span<const int64_t> shape) {
  TensorGeometry g;
  ANCHOR_ASSIGN_OR_RETURN(g.dtype, DTypeFromProto(tensor, dtype));
  ANCHOR_ASSIGN_OR_RETURN(g.layout, LayoutFromProto(tensor, layout));
  const bool token_major = g.layout == Layout::kTokenMajor;
  g.seq_axis = token_major ? 0 : 1;
  g.heads_axis = token_major ? 1 : 0;
  if (shape.size() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat(tensor, ".shape must have 3 dims ",
                     token_major ? "[seq_len, num_heads, head_dim] for TENSOR_LAYOUT_TOKEN_MAJOR"
                                 : "[num_heads, seq_len, head_dim] for TENSOR_LAYOUT_HEAD_MAJOR",
                     ", got ", shape.size(), " ", DimsString(shape)));
  }
  g.dims.assign(shape.begin(), shape.end());
  const char* meaning[3] = {token_major ? "seq_len" : "num_heads",
                            token_major ? "num_heads" : "seq_len", "head_dim"};
  for (int axis = 0; axis < 3; ++axis) {
    if (g.dims[axis] <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(AxisName(tensor, axis, meaning[axis]),
                                                     " must be positive, got ", g.dims[axis]));
    }
  }
  int64_t elements = 1;
  for (int64_t dim : g.dims) {
    if (__builtin_mul_overflow(elements, dim, &elements)) {
      return absl::InvalidArgumentError(absl::StrCat(tensor, ".shape ", DimsString(g.dims),
                                                     " has more elements than int64 can count"));
    }
  }
  int64_t bytes = 0;
  if (__builtin_mul_overflow(elements, static_cast<int64_t>(ElementSize(g.dtype)), &bytes)) {
    return absl::InvalidArgumentError(absl::StrCat(tensor, ".shape ", DimsString(g.dims), " ",
                                                   DTypeText(g.dtype),
                                                   " has more bytes than int64 can count"));
  }
  g.elements = elements;
  g.bytes = bytes;
  if (g.head_dim() > kMaxHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat(
        AxisName(tensor, 2, "head_dim"), " must be at most ", kMaxHeadDim, ", got ", g.head_dim()));
  }
  return g;
}

absl::Status CheckTensorLimits(absl::string_view tensor, const TensorGeometry& g,
                               const ConvertOptions& options) {
  if (g.seq_len() > options.max_seq_len) {
    return absl::ResourceExhaustedError(
        absl::StrCat(AxisName(tensor, g.seq_axis, "seq_len"), " = ", g.seq_len(),
                     " is over the limit --max_seq_len=", options.max_seq_len));
  }
  if (g.num_heads() > options.max_heads) {
    return absl::ResourceExhaustedError(
        absl::StrCat(AxisName(tensor, g.heads_axis, "num_heads"), " = ", g.num_heads(),
                     " is over the limit --max_heads=", options.max_heads));
  }
  return absl::OkStatus();
}

// k and v against q, and v against k.
absl::Status CheckConsistent(const TensorGeometry& q, absl::string_view name,
                             const TensorGeometry& t) {
  if (t.dtype != q.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ".dtype (", DTypeText(t.dtype), ") must equal q.dtype (", DTypeText(q.dtype), ")"));
  }
  if (t.layout != q.layout) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ".layout (", v1::TensorLayout_Name(LayoutToProto(t.layout)),
        ") must equal q.layout (", v1::TensorLayout_Name(LayoutToProto(q.layout)), ")"));
  }
  if (t.seq_len() != q.seq_len()) {
    return absl::InvalidArgumentError(
        absl::StrCat(AxisName(name, t.seq_axis, "seq_len"), " = ", t.seq_len(), " must equal ",
                     AxisName("q", q.seq_axis, "seq_len"), " = ", q.seq_len(),
                     " (causal prefill: kv_len == q_len)"));
  }
  if (t.head_dim() != q.head_dim()) {
    return absl::InvalidArgumentError(
        absl::StrCat(AxisName(name, 2, "head_dim"), " = ", t.head_dim(), " must equal ",
                     AxisName("q", 2, "head_dim"), " = ", q.head_dim()));
  }
  return absl::OkStatus();
}

absl::StatusOr<RequestSpec> BuildSpec(const TensorGeometry& q, const TensorGeometry& k,
                                      const TensorGeometry& v, const v1::AnchorConfig& config,
                                      const v1::RequestOptions& request_options,
                                      const ConvertOptions& options) {
  ANCHOR_RETURN_IF_ERROR(CheckConsistent(q, "k", k));
  ANCHOR_RETURN_IF_ERROR(CheckConsistent(q, "v", v));
  if (v.dims != k.dims) {
    return absl::InvalidArgumentError(
        absl::StrCat("v.shape ", DimsString(v.dims), " must equal k.shape ", DimsString(k.dims)));
  }
  if (q.num_heads() % k.num_heads() != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        AxisName("q", q.heads_axis, "num_heads"), " = ", q.num_heads(), " must be a multiple of ",
        AxisName("k", k.heads_axis, "num_heads"), " = ", k.num_heads()));
  }
  ANCHOR_RETURN_IF_ERROR(CheckTensorLimits("q", q, options));
  ANCHOR_RETURN_IF_ERROR(CheckTensorLimits("k", k, options));
  // Each byte count fits int64, their sum need not.
  int64_t total = 0;
  if (__builtin_add_overflow(q.bytes, k.bytes, &total) ||
      __builtin_add_overflow(total, v.bytes, &total)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("q, k and v hold more bytes together than int64 can count, over the limit "
                     "--max_request_bytes=",
                     options.max_request_bytes));
  }
  if (total > options.max_request_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "q, k and v hold ", total,
        " bytes together, over the limit --max_request_bytes=", options.max_request_bytes));
  }

  RequestSpec spec;
  spec.shape.seq_len = q.seq_len();
  spec.shape.num_q_heads = static_cast<int>(q.num_heads());
  spec.shape.num_kv_heads = static_cast<int>(k.num_heads());
  spec.shape.head_dim = static_cast<int>(q.head_dim());
  spec.dtype = q.dtype;
  spec.layout = q.layout;
  spec.q_bytes = q.bytes;
  spec.k_bytes = k.bytes;
  spec.v_bytes = v.bytes;
  spec.q_dims = q.dims;
  spec.metrics_only = request_options.metrics_only();
  spec.compute_recall = request_options.compute_recall();
  ANCHOR_ASSIGN_OR_RETURN(spec.config, MergeAnchorConfig(config, options.defaults));

  if (options.backend != nullptr) {
    const BackendInfo& info = options.backend_info;
    if (std::find(info.dtypes.begin(), info.dtypes.end(), spec.dtype) == info.dtypes.end()) {
      std::vector<absl::string_view> names;
      for (DType d : info.dtypes) names.push_back(DTypeText(d));
      return absl::FailedPreconditionError(
          absl::StrCat("q.dtype ", DTypeText(spec.dtype), " is not supported by the ", info.name,
                       " backend (supported: ", absl::StrJoin(names, ", "), ")"));
    }
    // Supports() looks at shape, dtype, layout and config only; the probe pointers are never
    // dereferenced, they only satisfy the non-null checks.
    static const char kProbe[1] = {0};
    AttentionTask probe;
    ApplySpec(spec, &probe);
    probe.q = probe.k = probe.v = kProbe;
    probe.out = const_cast<char*>(kProbe);
    ANCHOR_RETURN_IF_ERROR(options.backend->Supports(probe));
  }
  return spec;
}

}  // namespace

ConvertOptions MakeConvertOptions(const ServerConfig& config, const AttentionBackend* backend) {
  ConvertOptions options;
  options.max_seq_len = config.max_seq_len;
  options.max_heads = config.max_heads;
  options.max_request_bytes = config.max_request_bytes;
  options.max_message_bytes = config.max_message_bytes;
  options.defaults = config.defaults;
  options.backend = backend;
  if (backend != nullptr) options.backend_info = backend->Info();
  return options;
}

absl::StatusOr<AnchorConfig> MergeAnchorConfig(const v1::AnchorConfig& request,
                                               const AnchorConfig& defaults) {
  AnchorConfig config = defaults;
  switch (request.mode()) {
    case v1::ATTENTION_MODE_UNSPECIFIED:
    case v1::ATTENTION_MODE_ANCHOR:
      config.mode = AttentionMode::kAnchor;
      break;
    case v1::ATTENTION_MODE_DENSE:
      config.mode = AttentionMode::kDense;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "config.mode must be ATTENTION_MODE_ANCHOR or ATTENTION_MODE_DENSE, got unknown value ",
          static_cast<int>(request.mode())));
  }
  if (request.has_theta()) {
    if (std::isnan(request.theta())) {
      return absl::InvalidArgumentError("config.theta must not be NaN (+inf = dense is allowed)");
    }
    // Beyond float range is beyond any score difference: it saturates to +-inf.
    config.theta = static_cast<float>(request.theta());
  }
  if (request.has_block_size()) config.block_size = request.block_size();
  if (request.has_step()) config.step = request.step();
  if (request.has_init_groups()) config.init_groups = request.init_groups();
  if (request.has_local_groups()) config.local_groups = request.local_groups();
  if (request.has_softmax_scale()) {
    const double scale = request.softmax_scale();
    if (!std::isfinite(scale) || scale < 0 || scale > std::numeric_limits<float>::max()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "config.softmax_scale must be finite and >= 0 (0 = 1/sqrt(head_dim)), got ", scale));
    }
    config.softmax_scale = static_cast<float>(scale);
  }
  ANCHOR_RETURN_IF_ERROR(ValidateAnchorConfig(config));
  return config;
}

absl::StatusOr<RequestSpec> SpecFromAttendRequest(const v1::AttendRequest& request,
                                                  const ConvertOptions& options) {
  if (!request.has_q() || !request.has_k() || !request.has_v()) {
    return absl::InvalidArgumentError(
        absl::StrCat("request must set q, k and v; missing ",
                     !request.has_q() ? "q" : (!request.has_k() ? "k" : "v")));
  }
  ANCHOR_ASSIGN_OR_RETURN(TensorGeometry q, ParseTensor("q", request.q().dtype(),
                                                        request.q().layout(), request.q().shape()));
  ANCHOR_ASSIGN_OR_RETURN(TensorGeometry k, ParseTensor("k", request.k().dtype(),
                                                        request.k().layout(), request.k().shape()));
  ANCHOR_ASSIGN_OR_RETURN(TensorGeometry v, ParseTensor("v", request.v().dtype(),
                                                        request.v().layout(), request.v().shape()));
  ANCHOR_ASSIGN_OR_RETURN(RequestSpec spec,
                          BuildSpec(q, k, v, request.config(), request.options(), options));
  const struct {
    absl::string_view name;
    const TensorGeometry& geometry;
    const std::string& data;
  } tensors[] = {
      {"q", q, request.q().data()}, {"k", k, request.k().data()}, {"v", v, request.v().data()}};
  for (const auto& t : tensors) {
    if (static_cast<int64_t>(t.data.size()) != t.geometry.bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          t.name, ".data has ", t.data.size(), " bytes, expected ", t.geometry.bytes, " for shape ",
          DimsString(t.geometry.dims), " ", DTypeText(t.geometry.dtype)));
    }
  }
  if (!spec.metrics_only && spec.q_bytes > options.max_message_bytes - kMessageOverheadBytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the output (", spec.q_bytes,
                     " bytes) does not fit one response message (limit "
                     "--max_message_bytes=",
                     options.max_message_bytes, " with ", kMessageOverheadBytes,
                     " bytes reserved for metrics); use AttendStream or "
                     "options.metrics_only"));
  }
  return spec;
}

absl::StatusOr<RequestSpec> SpecFromStreamHeader(const v1::StreamHeader& header,
                                                 const ConvertOptions& options) {
  if (!header.has_q() || !header.has_k() || !header.has_v()) {
    return absl::InvalidArgumentError(
        absl::StrCat("header must set q, k and v; missing header.",
                     !header.has_q() ? "q" : (!header.has_k() ? "k" : "v")));
  }
  ANCHOR_ASSIGN_OR_RETURN(TensorGeometry q, ParseTensor("q", header.q().dtype(),
                                                        header.q().layout(), header.q().shape()));
  ANCHOR_ASSIGN_OR_RETURN(TensorGeometry k, ParseTensor("k", header.k().dtype(),
                                                        header.k().layout(), header.k().shape()));
  ANCHOR_ASSIGN_OR_RETURN(TensorGeometry v, ParseTensor("v", header.v().dtype(),
                                                        header.v().layout(), header.v().shape()));
  return BuildSpec(q, k, v, header.config(), header.options(), options);
}

void ApplySpec(const RequestSpec& spec, AttentionTask* task) {
  task->shape = spec.shape;
  task->dtype = spec.dtype;
  task->layout = spec.layout;
  task->config = spec.config;
}

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

v1::AnchorConfig AnchorConfigToProto(const AnchorConfig& config) {
  v1::AnchorConfig proto;
  proto.set_mode(config.mode == AttentionMode::kDense ? v1::ATTENTION_MODE_DENSE
                                                      : v1::ATTENTION_MODE_ANCHOR);
  proto.set_theta(config.theta);
  proto.set_block_size(config.block_size);
  proto.set_step(config.step);
  proto.set_init_groups(config.init_groups);
  proto.set_local_groups(config.local_groups);
  proto.set_softmax_scale(config.softmax_scale);
  return proto;
}

v1::TensorSpec OutputSpec(const RequestSpec& spec) {
  v1::TensorSpec out;
  out.set_dtype(DTypeToProto(spec.dtype));
  out.set_layout(LayoutToProto(spec.layout));
  for (int64_t dim : spec.q_dims) out.add_shape(dim);
  return out;
}

void SetOutputTensorSpec(const RequestSpec& spec, v1::Tensor* tensor) {
  tensor->set_dtype(DTypeToProto(spec.dtype));
  tensor->set_layout(LayoutToProto(spec.layout));
  tensor->clear_shape();
  for (int64_t dim : spec.q_dims) tensor->add_shape(dim);
}

namespace {
void FillStripes(const StripeSummary& summary, v1::StripeStats* stats) {
  stats->set_min(summary.min);
  stats->set_mean(summary.mean);
  stats->set_max(summary.max);
  stats->set_groups(summary.groups);
}
}  // namespace

void FillAttentionMetrics(const AttentionJob& job, absl::string_view backend_name,
                          v1::AttentionMetrics* metrics) {
  const RequestSummary& summary = job.summary;
  metrics->set_density(summary.density);
  metrics->set_sparsity(1.0 - summary.density);
  metrics->set_stripe_density(summary.stripe_density);
  FillStripes(summary.stripes, metrics->mutable_stripes_per_group());
  metrics->clear_heads();
  for (size_t h = 0; h < summary.heads.size(); ++h) {
    const HeadSummary& head = summary.heads[h];
    v1::HeadMetrics* out = metrics->add_heads();
    out->set_head(static_cast<int32_t>(h));
    out->set_density(head.density);
    out->set_sparsity(1.0 - head.density);
    out->set_stripe_density(head.stripe_density);
    FillStripes(head.stripes, out->mutable_stripes_per_group());
  }
  metrics->set_queue_seconds(job.queue_seconds);
  metrics->set_identification_seconds(job.task.times.identification_seconds);
  metrics->set_compute_seconds(job.task.times.compute_seconds);
  metrics->set_transfer_seconds(job.task.times.transfer_seconds);
  metrics->set_batch_size(job.batch_size);
  metrics->set_backend(std::string(backend_name));
  if (job.recall.has_value()) {
    v1::Recall* recall = metrics->mutable_recall();
    recall->set_output_recall_tau_0_01(job.recall->output_recall_tau_0_01);
    recall->set_output_recall_tau_0_005(job.recall->output_recall_tau_0_005);
    recall->set_attention_mass_mean(job.recall->attention_mass_mean);
    recall->set_attention_mass_min(job.recall->attention_mass_min);
  } else {
    metrics->clear_recall();
  }
  AnchorConfig effective = job.task.config;
  effective.softmax_scale = effective.ScaleFor(job.task.shape.head_dim);
  *metrics->mutable_effective_config() = AnchorConfigToProto(effective);
}

}  // namespace anchorserve
