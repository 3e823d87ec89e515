#include "server/prefill_service.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/status_macros.h"
#include "proto/anchorserve/v1/convert.h"
#include "server/chunked_tensor_writer.h"
#include "server/prefill_job.h"
#include "server/proto_convert.h"
#include "server/rpc_support.h"
#include "server/status_convert.h"

namespace anchorserve {

double PrefillRunner::Run(absl::Span<BatchJob* const> batch) {
  const auto start = std::chrono::steady_clock::now();
  for (BatchJob* batch_job : batch) {
    // The batch key is the prefill kind's, so every job here is a PrefillJob.
    auto* job = static_cast<PrefillJob*>(batch_job);
    if (job->Cancelled()) {
      job->status = absl::CancelledError("prefill cancelled before it started");
      continue;
    }
    absl::StatusOr<PrefillResult> result = engine_->Run(job->task, job->sink);
    ReportKeptPinnedBytes();
    if (!result.ok()) {
      job->status = result.status();
      continue;
    }
    job->result = *std::move(result);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void PrefillRunner::ReportKeptPinnedBytes() {
  const int64_t kept = engine_->KeptPinnedHostBytes();
  if (metrics_ != nullptr && kept != reported_pinned_bytes_) {
    metrics_->AddPinnedHostBytes(kept - reported_pinned_bytes_);
  }
  reported_pinned_bytes_ = kept;
}

namespace {

absl::Status FieldError(absl::string_view field, absl::string_view requirement) {
  return absl::InvalidArgumentError(absl::StrCat(field, " ", requirement));
}

absl::StatusOr<LogitsMode> LogitsModeFromProto(int value) {
  switch (value) {
    case v1::LOGITS_MODE_UNSPECIFIED:
    case v1::LOGITS_MODE_FULL:
      return LogitsMode::kFull;
    case v1::LOGITS_MODE_TOP_K:
      return LogitsMode::kTopK;
    case v1::LOGITS_MODE_NONE:
      return LogitsMode::kNone;
    default:
      return FieldError("logits_mode", absl::StrCat("has unknown value ", value));
  }
}

v1::RopeInfo RopeInfoProto(const ModelConfig& config) {
  v1::RopeInfo rope;
  rope.set_style("rotate_half");
  rope.set_theta(config.rope.theta);
  if (config.rope.type == RopeType::kLlama3) {
    rope.set_scaling("llama3");
    rope.set_factor(config.rope.factor);
    rope.set_low_freq_factor(config.rope.low_freq_factor);
    rope.set_high_freq_factor(config.rope.high_freq_factor);
    rope.set_original_max_position_embeddings(config.rope.original_max_position_embeddings);
  } else {
    rope.set_scaling("none");
  }
  return rope;
}

}  // namespace

absl::StatusOr<PrefillSpec> PrefillSpecFromRequest(const v1::PrefillRequest& request,
                                                   const Model& model, const ServerConfig& config) {
  return PrefillSpecFromRequest(request, model.config(), model.fingerprint(), model.dir(), config);
}

absl::StatusOr<PrefillSpec> PrefillSpecFromRequest(const v1::PrefillRequest& request,
                                                   const ModelConfig& mc,
                                                   absl::string_view model_fingerprint,
                                                   absl::string_view model_dir,
                                                   const ServerConfig& config) {
  PrefillSpec spec;
  ANCHOR_RETURN_IF_ERROR(CheckRequestId("request_id", request.request_id()));
  const int64_t n = request.token_ids_size();
  if (n == 0) return FieldError("token_ids", "must not be empty");
  const int64_t max_tokens = std::min(mc.max_position_embeddings, config.max_seq_len);
  if (n > max_tokens) {
    return absl::OutOfRangeError(absl::StrCat("token_ids has ", n, " tokens, more than ",
                                              max_tokens == config.max_seq_len
                                                  ? "--max_seq_len="
                                                  : "the model's max_position_embeddings ",
                                              max_tokens));
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t id = request.token_ids(static_cast<int>(i));
    if (id < 0 || id >= mc.vocab_size) {
      return FieldError(
          absl::StrCat("token_ids[", i, "]"),
          absl::StrCat("must be in [0, ", mc.vocab_size, ") (the model's vocab), got ", id));
    }
  }
  spec.token_ids.assign(request.token_ids().begin(), request.token_ids().end());

  absl::StatusOr<AnchorConfig> anchor = AnchorConfigFromProto(request.config(), config.defaults);
  if (!anchor.ok()) return anchor.status();
  spec.config = *anchor;
  // Every layer sees the whole prompt, so one choice serves them all.
  ModeChoice mode = ResolveMode(spec.config, static_cast<int64_t>(spec.token_ids.size()));
  spec.config.mode = mode.mode;
  spec.mode_choice = std::move(mode.reason);

  switch (request.kv_selection()) {
    case v1::KV_SELECTION_UNSPECIFIED:
    case v1::KV_SELECTION_ALL:
      spec.kv_layer_begin = 0;
      spec.kv_layer_end = mc.num_layers;
      break;
    case v1::KV_SELECTION_NONE:
      spec.kv_layer_begin = spec.kv_layer_end = 0;
      break;
    case v1::KV_SELECTION_RANGE:
      if (request.kv_layer_begin() < 0 || request.kv_layer_end() > mc.num_layers ||
          request.kv_layer_begin() >= request.kv_layer_end()) {
        return FieldError("kv_layer_begin/kv_layer_end",
                          absl::StrCat("must satisfy 0 <= begin < end <= ", mc.num_layers,
                                       " (the model's layers), got [", request.kv_layer_begin(),
                                       ", ", request.kv_layer_end(), ")"));
      }
      spec.kv_layer_begin = request.kv_layer_begin();
      spec.kv_layer_end = request.kv_layer_end();
      break;
    default:
      return FieldError("kv_selection", absl::StrCat("has unknown value ",
                                                     static_cast<int>(request.kv_selection())));
  }

  if (request.kv_dtype() != v1::DATA_TYPE_UNSPECIFIED) {
    absl::StatusOr<DType> dtype = DTypeFromProto("kv_dtype", request.kv_dtype());
    if (!dtype.ok()) return dtype.status();
    spec.kv_dtype = *dtype;
  }
  if (request.kv_layout() != v1::TENSOR_LAYOUT_UNSPECIFIED) {
    absl::StatusOr<Layout> layout = LayoutFromProto("kv_layout", request.kv_layout());
    if (!layout.ok()) return layout.status();
    spec.kv_layout = *layout;
  }

  absl::StatusOr<LogitsMode> logits = LogitsModeFromProto(request.logits_mode());
  if (!logits.ok()) return logits.status();
  spec.logits_mode = *logits;
  if (spec.logits_mode == LogitsMode::kTopK) {
    if (request.logits_top_k() < 1 || request.logits_top_k() > mc.vocab_size) {
      return FieldError("logits_top_k",
                        absl::StrCat("must be in [1, ", mc.vocab_size,
                                     "] with LOGITS_MODE_TOP_K, got ", request.logits_top_k()));
    }
    spec.logits_top_k = request.logits_top_k();
  }

  if (!request.expected_fingerprint().empty() &&
      request.expected_fingerprint() != model_fingerprint) {
    return absl::FailedPreconditionError(
        absl::StrCat("expected_fingerprint ", request.expected_fingerprint(),
                     " differs from the loaded model's ", model_fingerprint, " (", model_dir, ")"));
  }
  spec.tensor_bytes = n * mc.KvDim() * static_cast<int64_t>(ElementSize(spec.kv_dtype));
  return spec;
}

v1::ModelInfo ModelInfoProto(const Model& model) {
  const ModelConfig& mc = model.config();
  v1::ModelInfo info;
  info.set_architecture(mc.architecture == Architecture::kQwen2 ? "Qwen2ForCausalLM"
                                                                : "LlamaForCausalLM");
  info.set_num_layers(mc.num_layers);
  info.set_hidden_size(mc.hidden_size);
  info.set_num_q_heads(mc.num_heads);
  info.set_num_kv_heads(mc.num_kv_heads);
  info.set_head_dim(mc.head_dim);
  info.set_intermediate_size(mc.intermediate_size);
  info.set_vocab_size(mc.vocab_size);
  info.set_max_position_embeddings(mc.max_position_embeddings);
  info.set_weight_dtype(DTypeToProto(model.weight_dtype()));
  info.set_num_parameters(model.num_parameters());
  info.set_fingerprint(model.fingerprint());
  info.set_kv_bytes_per_token(model.KvBytesPerToken(DType::kBf16));
  info.set_load_seconds(model.load_seconds());
  *info.mutable_rope() = RopeInfoProto(mc);
  info.set_tied_embeddings(mc.tie_word_embeddings);
  info.set_rms_norm_eps(mc.rms_norm_eps);
  return info;
}

namespace {

const grpc::Status& NoModelStatus() {
  static const auto* status = new grpc::Status(
      grpc::StatusCode::FAILED_PRECONDITION,
      "this server has no model loaded (start anchorserve with --model=DIR to serve Prefill)");
  return *status;
}

// Chunk tags of the writer: layer * 2 for K, layer * 2 + 1 for V.
constexpr int KvTag(int layer, bool is_v) { return layer * 2 + (is_v ? 1 : 0); }

void FillLogits(const PrefillSpec& spec, const std::vector<float>& logits, v1::Logits* out) {
  const int64_t vocab = static_cast<int64_t>(logits.size());
  if (vocab == 0) return;
  const int64_t argmax = std::max_element(logits.begin(), logits.end()) - logits.begin();
  out->set_argmax_token_id(static_cast<int32_t>(argmax));
  if (spec.logits_mode == LogitsMode::kFull) {
    out->mutable_values()->Assign(logits.begin(), logits.end());
  } else if (spec.logits_mode == LogitsMode::kTopK) {
    // log-softmax in double: the log-probabilities of the top ids.
    double sum = 0;
    const double max_logit = logits[static_cast<size_t>(argmax)];
    for (float logit : logits) sum += std::exp(static_cast<double>(logit) - max_logit);
    const double log_normalizer = max_logit + std::log(sum);
    std::vector<int32_t> ids(static_cast<size_t>(vocab));
    std::iota(ids.begin(), ids.end(), 0);
    const int k = spec.logits_top_k;
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&logits](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    for (int i = 0; i < k; ++i) {
      v1::TopLogit* top = out->add_top();
      top->set_token_id(ids[i]);
      top->set_logit(logits[ids[i]]);
      top->set_logprob(static_cast<float>(logits[ids[i]] - log_normalizer));
    }
  }
}

// One Prefill call. It is the job's KvSink: the engine hands over each finished layer on the
// prefill worker thread, the reactor queues it for the writer and sends it chunk by chunk. The
// reactor never finishes while its job is queued or running (the job points at it).
class PrefillReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer>, public KvSink {
 public:
  PrefillReactor(PrefillServiceImpl* service, grpc::CallbackServerContext* context)
      : host_(service->host()),
        host_serving_(host_->serving_state()),
        serving_(service->serving()),
        context_(context),
        start_(host_->clock().Now()),
        writer_(host_->config().stream_chunk_bytes,
                [](int tag, int64_t offset, v1::PrefillResponse* out) {
                  v1::KvChunk* chunk = out->mutable_kv_chunk();
                  chunk->set_layer(tag / 2);
                  chunk->set_tensor(tag % 2 == 0 ? v1::TENSOR_NAME_K : v1::TENSOR_NAME_V);
                  chunk->set_offset(offset);
                }) {
    host_->RpcStarted();
  }

  void Start(const grpc::ByteBuffer& raw_request) {
    if (grpc::Status refused = AdmissionStatus(*host_, host_serving_, *context_, &caller_slot_);
        !refused.ok()) {
      return FinishEarly(refused);
    }
    if (serving_ == nullptr) {
      return FinishEarly(grpc::Status(grpc::StatusCode::UNAVAILABLE, "server is starting"));
    }
    host_->metrics().AddReceivedBytes(static_cast<int64_t>(raw_request.Length()));
    v1::PrefillRequest request;
    if (absl::Status parsed = ParseRawMessage(raw_request, "request", &request); !parsed.ok()) {
      return FinishEarly(ToGrpcStatus(parsed));
    }
    if (serving_->model == nullptr) return FinishEarly(NoModelStatus());
    absl::StatusOr<PrefillSpec> spec =
        PrefillSpecFromRequest(request, *serving_->model, host_->config());
    if (!spec.ok()) return FinishEarly(ToGrpcStatus(spec.status()));
    // What the engine cannot run (e.g. a mass target with step > 16 on cuda) is refused before
    // any work.
    if (absl::Status supported = serving_->engine->CanRun(spec->config); !supported.ok()) {
      return FinishEarly(ToGrpcStatus(supported));
    }
    const int64_t n = static_cast<int64_t>(spec->token_ids.size());
    const int64_t workspace = serving_->engine->WorkspaceBytes(n, spec->config);
    if (workspace > host_->config().prefill_memory_bytes) {
      return FinishEarly(ToGrpcStatus(absl::ResourceExhaustedError(
          absl::StrCat("a prefill of ", n, " tokens needs ", workspace,
                       " bytes of engine workspace, more than --prefill_memory_bytes=",
                       host_->config().prefill_memory_bytes))));
    }
    // The KV waiting to be sent: at most --prefill_buffer_bytes plus the one layer that may go
    // past it (OnLayer), never more than the whole requested KV.
    const int64_t layer_bytes = 2 * spec->tensor_bytes;
    const int64_t kv_total = layer_bytes * (spec->kv_layer_end - spec->kv_layer_begin);
    absl::StatusOr<MemoryCharge> charge = host_->memory_budget().Charge(
        std::min(kv_total, host_->config().prefill_buffer_bytes + layer_bytes),
        "Prefill KV output buffer");
    if (!charge.ok()) return FinishEarly(ToGrpcStatus(charge.status()));
    charge_ = *std::move(charge);
    request_id_ = host_->RequestIdFor(request.request_id());

    auto job = std::make_shared<PrefillJob>(std::move(spec->token_ids));
    job->task.config = spec->config;
    job->task.kv_layer_begin = spec->kv_layer_begin;
    job->task.kv_layer_end = spec->kv_layer_end;
    job->task.kv_dtype = spec->kv_dtype;
    job->task.kv_layout = spec->kv_layout;
    job->task.compute_logits = spec->logits_mode != LogitsMode::kNone;
    job->sink = this;
    job->deadline = DeadlineOf(*context_);
    job->on_done = [this, done = job.get()] { OnJobDone(*done); };
    spec_ = *std::move(spec);

    Next next;
    {
      absl::MutexLock lock(&mu_);
      writer_.PushMessage(HeaderMessage(n));
      job_ = job;
      // Lock order: this reactor's mu_, then the batcher's (the worker calls on_done unlocked).
      if (absl::Status queued = serving_->batcher->Enqueue(job); !queued.ok()) {
        job_.reset();
        writer_.Clear();
        RequestFinishLocked(ToGrpcStatus(queued), &next);
      } else {
        WriteNextLocked(&next);
      }
    }
    Apply(next);
  }

  // KvSink, on the prefill worker thread.
  absl::Status OnLayer(int layer, absl::Span<const char> k, absl::Span<const char> v) override {
    const int64_t bytes = static_cast<int64_t>(k.size() + v.size());
    HostBuffer k_copy = AllocateBytes(static_cast<int64_t>(k.size()), &host_->host_buffer_cache());
    HostBuffer v_copy = AllocateBytes(static_cast<int64_t>(v.size()), &host_->host_buffer_cache());
    if ((k_copy == nullptr && !k.empty()) || (v_copy == nullptr && !v.empty())) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", bytes, " bytes for layer ", layer, "'s K/V"));
    }
    Next next;
    {
      absl::MutexLock lock(&mu_);
      // Backpressure: wait while this call's unsent KV would exceed the buffer (a layer larger
      // than the buffer still goes once the queue is empty).
      const int64_t limit = host_->config().prefill_buffer_bytes;
      auto room = [this, bytes, limit]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return call_dead_ || writer_.pending_bytes() == 0 ||
               writer_.pending_bytes() + bytes <= limit;
      };
      while (!room()) room_.Wait(&mu_);
      if (call_dead_) return absl::CancelledError("the call ended while the prefill ran");
      std::memcpy(k_copy.get(), k.data(), k.size());
      std::memcpy(v_copy.get(), v.data(), v.size());
      writer_.PushTensor(KvTag(layer, false), std::move(k_copy), static_cast<int64_t>(k.size()));
      writer_.PushTensor(KvTag(layer, true), std::move(v_copy), static_cast<int64_t>(v.size()));
      kv_bytes_ += bytes;
      AccountPendingLocked();
      if (!write_in_flight_) WriteNextLocked(&next);
    }
    Apply(next);
    return absl::OkStatus();
  }

  void OnWriteDone(bool ok) override {
    Next next;
    {
      absl::MutexLock lock(&mu_);
      write_in_flight_ = false;
      room_.SignalAll();
      if (!ok) {
        MarkCallDeadLocked();
        RequestFinishLocked(
            grpc::Status(grpc::StatusCode::CANCELLED, "client stopped reading the stream"), &next);
      } else if (pending_finish_.has_value()) {
        RequestFinishLocked(*pending_finish_, &next);
      } else {
        WriteNextLocked(&next);
      }
    }
    Apply(next);
  }

  void OnCancel() override {
    Next next;
    {
      absl::MutexLock lock(&mu_);
      MarkCallDeadLocked();
      RequestFinishLocked(CancelledCallStatus(DeadlineOf(*context_), host_->clock().Now()), &next);
    }
    Apply(next);
  }

  void OnDone() override {
    host_->metrics().ObserveRequestDuration(Rpc::kPrefill,
                                            absl::ToDoubleSeconds(host_->clock().Now() - start_));
    AttentionServiceImpl* host = host_;
    delete this;
    host->RpcDone();
  }

 private:
  // gRPC operations decided under the lock and started after it is released (a reaction may
  // run on another thread at once, and Finish may lead to OnDone deleting this reactor).
  struct Next {
    bool write = false;
    std::optional<grpc::Status> finish;
  };

  void Apply(const Next& next) {
    if (next.finish.has_value()) return FinishNow(*next.finish);
    if (next.write) {
      // Serialized here, as gRPC would at StartWrite; the one write in flight owns response_ and
      // chunk_ (whose bytes gRPC sends from the layer's buffer, not copied).
      SerializeWithChunk(response_, v1::PrefillResponse::kKvChunkFieldNumber,
                         v1::KvChunk::kDataFieldNumber, std::move(chunk_.owner), chunk_.bytes,
                         &response_buffer_);
      StartWrite(&response_buffer_);
    }
  }

  // Before anything was queued or written.
  void FinishEarly(const grpc::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      finished_ = true;
    }
    FinishNow(status);
  }

  void FinishNow(const grpc::Status& status) {
    host_->metrics().CountRequest(Rpc::kPrefill, status.error_code(), caller_slot_.caller());
    Finish(status);  // `this` may be gone after this call
  }

  v1::PrefillResponse HeaderMessage(int64_t n) const {
    const ModelConfig& mc = serving_->model->config();
    v1::PrefillResponse message;
    v1::PrefillHeader* header = message.mutable_header();
    header->set_model_fingerprint(serving_->model->fingerprint());
    header->set_num_tokens(n);
    header->set_num_layers(mc.num_layers);
    header->set_kv_layer_begin(spec_.kv_layer_begin);
    header->set_kv_layer_end(spec_.kv_layer_end);
    header->set_num_kv_heads(mc.num_kv_heads);
    header->set_head_dim(mc.head_dim);
    header->set_kv_dtype(DTypeToProto(spec_.kv_dtype));
    header->set_kv_layout(LayoutToProto(spec_.kv_layout));
    *header->mutable_rope() = RopeInfoProto(mc);
    header->set_bytes_per_layer(2 * spec_.tensor_bytes);
    const int64_t dims[3] = {spec_.kv_layout == Layout::kHeadMajor ? mc.num_kv_heads : n,
                             spec_.kv_layout == Layout::kHeadMajor ? n : mc.num_kv_heads,
                             mc.head_dim};
    SetTensorSpec(spec_.kv_dtype, spec_.kv_layout, dims, header->mutable_kv_spec());
    return message;
  }

  // Keeps anchorserve_prefill_pending_kv_bytes in step with the writer.
  void AccountPendingLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int64_t pending = writer_.pending_bytes();
    host_->metrics().AddPrefillPendingKvBytes(pending - accounted_pending_);
    accounted_pending_ = pending;
  }

  void MarkCallDeadLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    call_dead_ = true;
    room_.SignalAll();
    if (job_ != nullptr) {
      job_->cancelled.store(true);
      serving_->batcher->Wake();
    }
  }

  // Finish once no write is in flight and the job (which points at this reactor) is done.
  void RequestFinishLocked(const grpc::Status& status, Next* next)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    if (write_in_flight_ || job_ != nullptr) {
      if (!pending_finish_.has_value()) pending_finish_ = status;
      return;
    }
    finished_ = true;
    writer_.Clear();
    AccountPendingLocked();
    next->finish = status;
  }

  // The next queued message, or the status once the job is done and everything is sent.
  void WriteNextLocked(Next* next) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_ || write_in_flight_) return;
    if (!call_dead_ && writer_.Next(&response_, &chunk_)) {
      response_.set_request_id(request_id_);
      if (response_.has_kv_chunk() && first_kv_seconds_ < 0) {
        first_kv_seconds_ = absl::ToDoubleSeconds(host_->clock().Now() - start_);
      }
      host_->metrics().AddSentBytes(
          static_cast<int64_t>(response_.ByteSizeLong() + chunk_.bytes.size()));
      AccountPendingLocked();
      write_in_flight_ = true;
      next->write = true;
      return;
    }
    if (pending_finish_.has_value()) return RequestFinishLocked(*pending_finish_, next);
    if (job_done_) RequestFinishLocked(grpc::Status::OK, next);
  }

  // On the prefill worker thread.
  void OnJobDone(PrefillJob& job) {
    Next next;
    {
      absl::MutexLock lock(&mu_);
      job_.reset();
      job_done_ = true;
      const absl::Time now = host_->clock().Now();
      if (pending_finish_.has_value()) {
        // The call already ended (cancelled, deadline, client gone): its status stands.
      } else if (!job.status.ok()) {
        writer_.Clear();
        AccountPendingLocked();
        pending_finish_ = FailedJobStatus(job, now, *context_, host_->draining());
      } else if (call_dead_ || context_->IsCancelled()) {
        pending_finish_ = CancelledCallStatus(job.deadline, now);
      } else {
        if (spec_.logits_mode != LogitsMode::kNone) {
          v1::PrefillResponse logits;
          FillLogits(spec_, job.result.last_logits, logits.mutable_logits());
          writer_.PushMessage(std::move(logits));
        }
        writer_.PushMessage(MetricsMessage(job, now));
        host_->metrics().CountModeRun(spec_.config.mode == AttentionMode::kDense,
                                      !spec_.mode_choice.empty());
      }
      WriteNextLocked(&next);
    }
    Apply(next);
  }

  v1::PrefillResponse MetricsMessage(const PrefillJob& job, absl::Time now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    v1::PrefillResponse message;
    v1::PrefillMetrics* metrics = message.mutable_metrics();
    double density_sum = 0;
    for (size_t i = 0; i < job.result.layers.size(); ++i) {
      const PrefillLayerStats& stats = job.result.layers[i];
      v1::PrefillLayerMetrics* layer = metrics->add_layers();
      layer->set_layer(static_cast<int32_t>(i));
      layer->set_density(stats.density);
      layer->set_identification_seconds(stats.identification_seconds);
      layer->set_attention_seconds(stats.attention_seconds);
      layer->set_layer_seconds(stats.layer_seconds);
      layer->set_gemm_seconds(stats.gemm_seconds);
      density_sum += stats.density;
    }
    if (!job.result.layers.empty()) {
      metrics->set_density(density_sum / static_cast<double>(job.result.layers.size()));
    }
    metrics->set_queue_seconds(job.queue_seconds);
    metrics->set_compute_seconds(job.result.compute_seconds);
    metrics->set_transfer_seconds(0);
    metrics->set_time_to_first_kv_byte_seconds(std::max(0.0, first_kv_seconds_));
    metrics->set_time_to_last_byte_seconds(absl::ToDoubleSeconds(now - start_));
    if (job.result.compute_seconds > 0) {
      metrics->set_tokens_per_second(static_cast<double>(job.tokens()) /
                                     job.result.compute_seconds);
    }
    metrics->set_backend(serving_->engine->name());
    *metrics->mutable_effective_config() = AnchorConfigToProto(spec_.config);
    metrics->set_mode_choice(spec_.mode_choice);
    metrics->set_kv_bytes(kv_bytes_);
    return message;
  }

  AttentionServiceImpl* const host_;
  const ServingState* const host_serving_;  // null while starting
  const PrefillServing* const serving_;     // null while starting
  grpc::CallbackServerContext* const context_;
  CallerSlot caller_slot_;  // the caller's name and its --max_inflight_per_caller slot
  const absl::Time start_;
  PrefillSpec spec_;        // set in Start, read-only after
  std::string request_id_;  // set in Start, read-only after

  absl::Mutex mu_;
  absl::CondVar room_;            // the writer took bytes, or the call died
  v1::PrefillResponse response_;  // source of the one write in flight
  ChunkedTensorWriter<v1::PrefillResponse>::ChunkBytes chunk_;  // its chunk's bytes
  grpc::ByteBuffer response_buffer_;                            // response_ serialized
  ChunkedTensorWriter<v1::PrefillResponse> writer_ ABSL_GUARDED_BY(mu_);
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool call_dead_ ABSL_GUARDED_BY(mu_) = false;  // cancelled, or the client stopped reading
  bool job_done_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<grpc::Status> pending_finish_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<PrefillJob> job_ ABSL_GUARDED_BY(mu_);  // while queued or running
  int64_t kv_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t accounted_pending_ ABSL_GUARDED_BY(mu_) = 0;  // in the pending-bytes gauge
  double first_kv_seconds_ ABSL_GUARDED_BY(mu_) = -1;
  MemoryCharge charge_;  // the KV output buffer in the memory budget; set in Start, given back
                         // when the reactor is deleted
};

}  // namespace

absl::Status PrefillServiceImpl::SetReady(const Model* model, PrefillEngine* engine,
                                          DynamicBatcher* batcher) {
  if (model != nullptr && (engine == nullptr || batcher == nullptr)) {
    return absl::InvalidArgumentError("SetReady with a model needs an engine and a batcher");
  }
  absl::MutexLock lock(&ready_mu_);
  if (owned_serving_ != nullptr) return absl::FailedPreconditionError("SetReady called twice");
  owned_serving_ = std::make_unique<const PrefillServing>(PrefillServing{model, engine, batcher});
  serving_.store(owned_serving_.get(), std::memory_order_release);
  return absl::OkStatus();
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* PrefillServiceImpl::Prefill(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  auto* reactor = new PrefillReactor(this, context);
  reactor->Start(*request);
  return reactor;
}

grpc::ServerUnaryReactor* PrefillServiceImpl::GetModelInfo(grpc::CallbackServerContext* context,
                                                           const grpc::ByteBuffer* raw_request,
                                                           grpc::ByteBuffer* raw_response) {
  auto* reactor = new TrackedUnaryReactor(host_, Rpc::kGetModelInfo);
  if (grpc::Status refused =
          AdmissionStatus(*host_, reactor->serving(), *context, reactor->caller_slot());
      !refused.ok()) {
    reactor->FinishOnce(refused);
    return reactor;
  }
  v1::GetModelInfoRequest request;  // no fields yet; parsed to reject garbage
  if (absl::Status parsed = ParseRawMessage(*raw_request, "request", &request); !parsed.ok()) {
    reactor->FinishOnce(ToGrpcStatus(parsed));
    return reactor;
  }
  const PrefillServing* prefill = serving();
  if (prefill == nullptr || prefill->model == nullptr) {
    reactor->FinishOnce(prefill == nullptr
                            ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "server is starting")
                            : NoModelStatus());
    return reactor;
  }
  const v1::ModelInfo response = ModelInfoProto(*prefill->model);
  host_->metrics().AddSentBytes(static_cast<int64_t>(response.ByteSizeLong()));
  SerializeToByteBuffer(response, raw_response);
  reactor->FinishOnce(grpc::Status::OK);
  return reactor;
}

}  // namespace anchorserve
