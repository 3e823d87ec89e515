#include "server/proto_convert.h"

#include <algorithm>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/dtype.h"
#include "kernels/status_macros.h"
#include "proto/anchorserve/v1/limits.h"

namespace anchorserve {
namespace {

// A tensor of a request, checked on its own: the shared geometry checks and head_dim <=
// kMaxHeadDim.
template <typename TensorMessage>  // v1::Tensor or v1::TensorSpec
absl::StatusOr<TensorGeometry> ParseTensor(absl::string_view name, const TensorMessage& tensor) {
  ANCHOR_ASSIGN_OR_RETURN(
      TensorGeometry g,
      TensorGeometryFromProto(name, tensor.dtype(), tensor.layout(), tensor.shape()));
  if (g.head_dim() > kMaxHeadDim) {
    return absl::InvalidArgumentError(
        absl::StrCat(g.AxisField(2), " must be at most ", kMaxHeadDim, ", got ", g.head_dim()));
  }
  return g;
}

// q, k and v of a request, each checked on its own.
struct QkvGeometry {
  TensorGeometry q;
  TensorGeometry k;
  TensorGeometry v;
};

// `missing_error` starts the error for an unset tensor; the tensor's name ends it.
template <typename Message>  // v1::AttendRequest or v1::StreamHeader
absl::StatusOr<QkvGeometry> ParseQkv(const Message& message, absl::string_view missing_error) {
  if (!message.has_q() || !message.has_k() || !message.has_v()) {
    return absl::InvalidArgumentError(
        absl::StrCat(missing_error, !message.has_q() ? "q" : (!message.has_k() ? "k" : "v")));
  }
  QkvGeometry qkv;
  ANCHOR_ASSIGN_OR_RETURN(qkv.q, ParseTensor("q", message.q()));
  ANCHOR_ASSIGN_OR_RETURN(qkv.k, ParseTensor("k", message.k()));
  ANCHOR_ASSIGN_OR_RETURN(qkv.v, ParseTensor("v", message.v()));
  return qkv;
}

absl::Status CheckTensorLimits(const TensorGeometry& g, const ConvertOptions& options) {
  if (g.seq_len() > options.max_seq_len) {
    return absl::ResourceExhaustedError(
        absl::StrCat(g.AxisField(g.seq_axis), " = ", g.seq_len(),
                     " is over the limit --max_seq_len=", options.max_seq_len));
  }
  if (g.num_heads() > options.max_heads) {
    return absl::ResourceExhaustedError(
        absl::StrCat(g.AxisField(g.heads_axis), " = ", g.num_heads(),
                     " is over the limit --max_heads=", options.max_heads));
  }
  return absl::OkStatus();
}

absl::StatusOr<RequestSpec> BuildSpec(const QkvGeometry& qkv, const v1::AnchorConfig& config,
                                      const v1::RequestOptions& request_options,
                                      const ConvertOptions& options) {
  const TensorGeometry& q = qkv.q;
  const TensorGeometry& k = qkv.k;
  const TensorGeometry& v = qkv.v;
  ANCHOR_RETURN_IF_ERROR(CheckQkvGeometry(q, k, v));
  ANCHOR_RETURN_IF_ERROR(CheckTensorLimits(q, options));
  ANCHOR_RETURN_IF_ERROR(CheckTensorLimits(k, options));
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
  ANCHOR_ASSIGN_OR_RETURN(spec.config, AnchorConfigFromProto(config, options.defaults));
  ModeChoice mode = ResolveMode(spec.config, spec.shape.seq_len);
  spec.config.mode = mode.mode;
  spec.mode_choice = std::move(mode.reason);

  if (options.backend != nullptr) {
    AttentionProblem problem;
    problem.shape = spec.shape;
    problem.dtype = spec.dtype;
    problem.layout = spec.layout;
    problem.config = spec.config;
    ANCHOR_RETURN_IF_ERROR(options.backend->CanRun(problem));
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

absl::StatusOr<RequestSpec> SpecFromAttendRequest(const v1::AttendRequest& request,
                                                  const ConvertOptions& options) {
  return SpecFromAttendRequest(request,
                               {static_cast<int64_t>(request.q().data().size()),
                                static_cast<int64_t>(request.k().data().size()),
                                static_cast<int64_t>(request.v().data().size())},
                               options);
}

absl::StatusOr<RequestSpec> SpecFromAttendRequest(const v1::AttendRequest& request,
                                                  const std::array<int64_t, 3>& data_bytes,
                                                  const ConvertOptions& options) {
  ANCHOR_RETURN_IF_ERROR(CheckRequestId("request_id", request.request_id()));
  ANCHOR_ASSIGN_OR_RETURN(const QkvGeometry qkv,
                          ParseQkv(request, "request must set q, k and v; missing "));
  ANCHOR_ASSIGN_OR_RETURN(RequestSpec spec,
                          BuildSpec(qkv, request.config(), request.options(), options));
  ANCHOR_RETURN_IF_ERROR(CheckByteCount("q.data", qkv.q, data_bytes[0]));
  ANCHOR_RETURN_IF_ERROR(CheckByteCount("k.data", qkv.k, data_bytes[1]));
  ANCHOR_RETURN_IF_ERROR(CheckByteCount("v.data", qkv.v, data_bytes[2]));
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
  ANCHOR_RETURN_IF_ERROR(CheckRequestId("header.request_id", header.request_id()));
  ANCHOR_ASSIGN_OR_RETURN(const QkvGeometry qkv,
                          ParseQkv(header, "header must set q, k and v; missing header."));
  return BuildSpec(qkv, header.config(), header.options(), options);
}

absl::Status CheckRequestId(absl::string_view field, absl::string_view request_id) {
  if (request_id.size() > static_cast<size_t>(kMaxRequestIdBytes)) {
    return absl::InvalidArgumentError(absl::StrCat(field, " is ", request_id.size(),
                                                   " bytes long, at most ", kMaxRequestIdBytes,
                                                   " are allowed"));
  }
  return absl::OkStatus();
}

absl::Status CheckFiniteInputs(const RequestSpec& spec, const void* q, const void* k,
                               const void* v) {
  const size_t element = ElementSize(spec.dtype);
  const struct {
    absl::string_view name;
    const void* data;
    int64_t bytes;
  } inputs[] = {{"q", q, spec.q_bytes}, {"k", k, spec.k_bytes}, {"v", v, spec.v_bytes}};
  for (const auto& input : inputs) {
    const int64_t count = input.bytes / static_cast<int64_t>(element);
    const int64_t index = FirstNonFinite(input.data, spec.dtype, count);
    if (index >= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          input.name, " holds a NaN or infinity (", std::string(DTypeName(spec.dtype)), " element ",
          index, " in memory order); every input element must be finite"));
    }
  }
  return absl::OkStatus();
}

void ApplySpec(const RequestSpec& spec, AttentionTask* task) {
  task->shape = spec.shape;
  task->dtype = spec.dtype;
  task->layout = spec.layout;
  task->config = spec.config;
}

std::shared_ptr<AttentionJob> MakeAttentionJob(const RequestSpec& spec, const void* q,
                                               const void* k, const void* v, void* out,
                                               absl::Time deadline) {
  auto job = std::make_shared<AttentionJob>();
  ApplySpec(spec, &job->task);
  job->task.q = q;
  job->task.k = k;
  job->task.v = v;
  job->task.out = out;
  job->deadline = deadline;
  job->compute_recall = spec.compute_recall;
  job->mode_choice = spec.mode_choice;
  job->UpdateBatchKey();
  return job;
}

v1::TensorSpec OutputSpec(const RequestSpec& spec) {
  v1::TensorSpec out;
  SetTensorSpec(spec.dtype, spec.layout, spec.q_dims, &out);
  return out;
}

void SetOutputTensorSpec(const RequestSpec& spec, v1::Tensor* tensor) {
  SetTensorSpec(spec.dtype, spec.layout, spec.q_dims, tensor);
}

namespace {
void FillStripes(const StripeSummary& summary, v1::StripeStats* stats) {
  stats->set_min(summary.min);
  stats->set_mean(summary.mean);
  stats->set_max(summary.max);
  stats->set_groups(summary.groups);
}

// `true_kept_mass` is measured only with compute_recall; without it the field stays 0.
void FillMassBudget(const MassSummary& summary, std::optional<double> true_kept_mass,
                    v1::MassBudget* budget) {
  budget->set_theta_min(summary.theta_min);
  budget->set_theta_mean(summary.theta_mean);
  budget->set_theta_max(summary.theta_max);
  budget->set_groups(summary.groups);
  budget->set_full_groups(summary.full_groups);
  budget->set_estimated_kept_mass(summary.estimated_kept_mass);
  if (true_kept_mass.has_value()) budget->set_true_kept_mass(*true_kept_mass);
}
}  // namespace

void FillAttentionMetrics(const AttentionJob& job, absl::string_view backend_name,
                          v1::AttentionMetrics* metrics) {
  const RequestSummary& summary = job.summary;
  metrics->set_density(summary.density);
  metrics->set_sparsity(1.0 - summary.density);
  metrics->set_stripe_density(summary.stripe_density);
  FillStripes(summary.stripes, metrics->mutable_stripes_per_group());
  // Mass budgets only where a mass target chose the thresholds (the counts are zero otherwise).
  const bool mass_target = job.task.config.UsesMassTarget();
  const bool head_recall =
      job.recall.has_value() && job.recall->head_attention_mass.size() == summary.heads.size();
  metrics->set_estimated_kept_mass(mass_target ? summary.estimated_kept_mass : 0.0);
  metrics->clear_heads();
  for (size_t h = 0; h < summary.heads.size(); ++h) {
    const HeadSummary& head = summary.heads[h];
    v1::HeadMetrics* out = metrics->add_heads();
    out->set_head(static_cast<int32_t>(h));
    out->set_density(head.density);
    out->set_sparsity(1.0 - head.density);
    out->set_stripe_density(head.stripe_density);
    FillStripes(head.stripes, out->mutable_stripes_per_group());
    if (mass_target) {
      FillMassBudget(
          head.mass,
          head_recall ? std::optional<double>(job.recall->head_attention_mass[h]) : std::nullopt,
          out->mutable_mass());
    }
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
  metrics->set_mode_choice(job.mode_choice);
}

}  // namespace anchorserve
