#include "server/attend_stream_reactor.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "server/attention_job.h"
#include "server/chunked_tensor_writer.h"
#include "server/proto_convert.h"
#include "server/rpc_support.h"
#include "server/status_convert.h"

namespace anchorserve {
namespace {

class AttendStreamReactor final
    : public grpc::ServerBidiReactor<v1::AttendStreamRequest, v1::AttendStreamResponse> {
 public:
  AttendStreamReactor(AttentionServiceImpl* service, grpc::CallbackServerContext* context)
      : service_(service),
        serving_(service->serving_state()),
        context_(context),
        start_(service->clock().Now()),
        writer_(service->config().stream_chunk_bytes,
                [this](int tag, int64_t offset, absl::string_view bytes,
                       v1::AttendStreamResponse* out) {
                  // Reuses the message (and its string's capacity) chunk after chunk.
                  v1::TensorChunk* chunk = out->mutable_chunk();
                  chunk->set_tensor(static_cast<v1::TensorName>(tag));
                  chunk->set_offset(offset);
                  chunk->mutable_data()->assign(bytes.data(), bytes.size());
                }),
        upload_([this] { OnUploadStalled(); }) {
    service_->RpcStarted();
  }

  void Start() {
    if (grpc::Status refused = AdmissionStatus(*service_, serving_, *context_, &caller_slot_);
        !refused.ok()) {
      {
        absl::MutexLock lock(&mu_);
        phase_ = Phase::kFinished;
      }
      return FinishNow(refused);
    }
    service_->upload_watchdog().Watch(&upload_);
    watched_ = true;
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (ok) upload_.Touch(service_->clock().Now());
    Next next;
    {
      absl::MutexLock lock(&mu_);
      if (phase_ == Phase::kFinished) return;
      if (!ok) {
        // Half-close (or a broken call): fine once every byte is in, an error before.
        if (phase_ == Phase::kHeader || phase_ == Phase::kReceiving) {
          RequestFinishLocked(
              context_->IsCancelled()
                  ? grpc::Status(grpc::StatusCode::CANCELLED, "call cancelled by the client")
                  : ToGrpcStatus(absl::InvalidArgumentError(EndedEarlyMessage())),
              &next);
        }
      } else {
        service_->metrics().AddReceivedBytes(static_cast<int64_t>(request_.ByteSizeLong()));
        absl::Status status = HandleMessageLocked();
        if (!status.ok()) {
          FailLocked(status, &next);
        } else {
          next.read = true;
        }
      }
    }
    Apply(next);
  }

  void OnWriteDone(bool ok) override {
    Next next;
    {
      absl::MutexLock lock(&mu_);
      write_in_flight_ = false;
      if (!ok) {
        RequestFinishLocked(
            grpc::Status(grpc::StatusCode::CANCELLED, "client stopped reading the output"), &next);
      } else if (pending_finish_.has_value()) {
        RequestFinishLocked(*pending_finish_, &next);
      } else if (!pending_error_.ok()) {
        RequestFinishLocked(ToGrpcStatus(pending_error_), &next);
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
      cancelled_ = true;
      if (phase_ == Phase::kComputing) {
        // The job comes back (dropped or abandoned) and finishes the call.
        if (job_ != nullptr) job_->cancelled.store(true);
        serving_->batcher->Wake();
      } else if (phase_ != Phase::kFinished) {
        RequestFinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "call cancelled"), &next);
      }
    }
    Apply(next);
  }

  void OnDone() override {
    // After this no stall callback runs, so deleting the reactor is safe.
    if (watched_) service_->upload_watchdog().Unwatch(&upload_);
    service_->metrics().ObserveRequestDuration(
        Rpc::kAttendStream, absl::ToDoubleSeconds(service_->clock().Now() - start_));
    AttentionServiceImpl* service = service_;
    delete this;
    service->RpcDone();
  }

 private:
  enum class Phase {
    kHeader,     // waiting for the header
    kReceiving,  // header in, tensor bytes arriving
    kComputing,  // all bytes in, the job is queued or running
    kSending,    // output_spec, chunks, metrics going out
    kFinished,   // Finish called (or about to be)
  };

  // One input tensor being received.
  struct Input {
    absl::string_view name;
    HostBuffer data;
    int64_t size = 0;
    int64_t received = 0;
  };

  // gRPC operations decided under the lock and started after it is released (a reaction may
  // run on another thread at once, and Finish may lead to OnDone deleting this reactor).
  struct Next {
    bool read = false;
    bool write = false;
    std::optional<grpc::Status> finish;
  };

  void Apply(Next& next) {
    if (next.finish.has_value()) return FinishNow(*next.finish);
    if (next.write) StartWrite(&response_);
    if (next.read) StartRead(&request_);
  }

  // On the watchdog's thread: no message arrived for --upload_stall_timeout_s.
  void OnUploadStalled() {
    Next next;
    {
      absl::MutexLock lock(&mu_);
      if (phase_ != Phase::kHeader && phase_ != Phase::kReceiving) return;
      service_->metrics().CountRefusal(Refusal::kUploadStall);
      RequestFinishLocked(
          grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                       absl::StrCat("upload stalled: no message for ",
                                    absl::FormatDuration(service_->upload_watchdog().timeout()),
                                    " (--upload_stall_timeout_s) before ",
                                    phase_ == Phase::kHeader ? "the header arrived"
                                                             : "all tensor data arrived")),
          &next);
    }
    Apply(next);
  }

  void FinishNow(const grpc::Status& status) {
    service_->metrics().CountRequest(Rpc::kAttendStream, status.error_code(),
                                     caller_slot_.caller());
    Finish(status);  // `this` may be gone after this call
  }

  // Finish as soon as no write is in flight (the status after the last message written).
  void RequestFinishLocked(const grpc::Status& status, Next* next)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (phase_ == Phase::kFinished) return;
    if (write_in_flight_) {
      if (!pending_finish_.has_value()) pending_finish_ = status;
      return;
    }
    phase_ = Phase::kFinished;
    upload_.Done();
    ReleaseBuffersLocked();
    next->finish = status;
  }

  // A protocol or validation error: finish now, or once the queued job comes back.
  void FailLocked(const absl::Status& status, Next* next) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (phase_ == Phase::kComputing) {
      if (pending_error_.ok()) pending_error_ = status;
      if (job_ != nullptr) job_->cancelled.store(true);
      serving_->batcher->Wake();
      return;
    }
    RequestFinishLocked(ToGrpcStatus(status), next);
  }

  absl::Status HandleMessageLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    switch (request_.kind_case()) {
      case v1::AttendStreamRequest::kHeader:
        if (phase_ != Phase::kHeader) {
          return absl::InvalidArgumentError(
              "second header: a stream carries exactly one request, its header first");
        }
        return HandleHeaderLocked(request_.header());
      case v1::AttendStreamRequest::kChunk:
        if (phase_ == Phase::kHeader) {
          return absl::InvalidArgumentError(
              "first message must be a header (got a chunk before any header)");
        }
        if (phase_ != Phase::kReceiving) {
          return absl::InvalidArgumentError(
              absl::StrCat("chunk of ", ChunkTensorName(request_.chunk().tensor()),
                           " after all tensor data arrived: bytes beyond the sizes the header "
                           "declared"));
        }
        return HandleChunkLocked(request_.chunk());
      case v1::AttendStreamRequest::KIND_NOT_SET:
        break;
    }
    if (phase_ == Phase::kHeader) {
      return absl::InvalidArgumentError(
          "first message must be a header (got a message with neither header nor chunk)");
    }
    return absl::InvalidArgumentError("message sets neither header nor chunk");
  }

  absl::Status HandleHeaderLocked(const v1::StreamHeader& header)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    absl::StatusOr<RequestSpec> spec = SpecFromStreamHeader(header, serving_->convert_options);
    if (!spec.ok()) return spec.status();
    spec_ = *std::move(spec);
    // Refused now when the whole request (inputs and output) cannot fit in what is free; its
    // bytes are charged as they arrive, so a stalled upload holds only what it sent.
    if (absl::Status fits = service_->memory_budget().CheckFits(
            spec_.q_bytes + spec_.k_bytes + spec_.v_bytes + spec_.q_bytes,
            "AttendStream request (q, k, v and output)");
        !fits.ok()) {
      return fits;
    }
    charge_ = service_->memory_budget().EmptyCharge();
    request_id_ = service_->RequestIdFor(header.request_id());
    const int64_t sizes[3] = {spec_.q_bytes, spec_.k_bytes, spec_.v_bytes};
    const absl::string_view names[3] = {"q", "k", "v"};
    for (int i = 0; i < 3; ++i) {
      inputs_[i].name = names[i];
      inputs_[i].size = sizes[i];
      inputs_[i].received = 0;
      inputs_[i].data = AllocateBytes(sizes[i], &service_->host_buffer_cache());
      if (inputs_[i].data == nullptr) {
        return absl::ResourceExhaustedError(
            absl::StrCat("cannot allocate ", sizes[i], " bytes for ", names[i]));
      }
    }
    phase_ = Phase::kReceiving;
    return absl::OkStatus();
  }

  static absl::string_view ChunkTensorName(int tensor) {
    switch (tensor) {
      case v1::TENSOR_NAME_Q:
        return "q";
      case v1::TENSOR_NAME_K:
        return "k";
      case v1::TENSOR_NAME_V:
        return "v";
      case v1::TENSOR_NAME_OUTPUT:
        return "output";
      default:
        return "an unknown tensor";
    }
  }

  absl::Status HandleChunkLocked(const v1::TensorChunk& chunk) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    int index = -1;
    switch (chunk.tensor()) {
      case v1::TENSOR_NAME_Q:
        index = 0;
        break;
      case v1::TENSOR_NAME_K:
        index = 1;
        break;
      case v1::TENSOR_NAME_V:
        index = 2;
        break;
      default:
        return absl::InvalidArgumentError(
            absl::StrCat("chunk.tensor must be TENSOR_NAME_Q, TENSOR_NAME_K or TENSOR_NAME_V, got ",
                         v1::TensorName_IsValid(chunk.tensor())
                             ? v1::TensorName_Name(chunk.tensor())
                             : absl::StrCat("unknown value ", static_cast<int>(chunk.tensor()))));
    }
    Input& input = inputs_[index];
    if (chunk.offset() != input.received) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk.offset of ", input.name, " is ", chunk.offset(), ", expected ",
                       input.received, ": each tensor's chunks must arrive in order without gaps"));
    }
    const int64_t bytes = static_cast<int64_t>(chunk.data().size());
    if (bytes > input.size - input.received) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chunk of ", input.name, " at chunk.offset ", chunk.offset(), " carries ", bytes,
          " bytes, beyond the ", input.size, " bytes its header spec declares"));
    }
    if (absl::Status charged = charge_.Grow(bytes, absl::StrCat("chunk of ", input.name));
        !charged.ok()) {
      return charged;
    }
    std::memcpy(input.data.get() + input.received, chunk.data().data(), static_cast<size_t>(bytes));
    input.received += bytes;
    if (AllReceivedLocked()) return StartComputeLocked();
    return absl::OkStatus();
  }

  bool AllReceivedLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return std::all_of(std::begin(inputs_), std::end(inputs_),
                       [](const Input& in) { return in.received == in.size; });
  }

  std::string EndedEarlyMessage() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (phase_ == Phase::kHeader) return "stream ended before a header arrived";
    std::vector<std::string> missing;
    for (const Input& in : inputs_) {
      if (in.received < in.size) {
        missing.push_back(absl::StrCat(in.name, " is missing ", in.size - in.received, " of ",
                                       in.size, " bytes"));
      }
    }
    return absl::StrCat("stream ended before all tensor data arrived: ",
                        absl::StrJoin(missing, "; "));
  }

  absl::Status StartComputeLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    upload_.Done();
    if (absl::Status charged = charge_.Grow(spec_.q_bytes, "output"); !charged.ok()) {
      return charged;
    }
    output_ = AllocateBytes(spec_.q_bytes, &service_->host_buffer_cache());
    if (output_ == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", spec_.q_bytes, " bytes for the output"));
    }
    std::shared_ptr<AttentionJob> job =
        MakeAttentionJob(spec_, inputs_[0].data.get(), inputs_[1].data.get(), inputs_[2].data.get(),
                         output_.get(), DeadlineOf(*context_));
    job->on_done = [this, done = job.get()] { OnJobDone(*done); };
    // Lock order: this reactor's mu_, then the batcher's (the worker calls on_done unlocked).
    absl::Status status = serving_->batcher->Enqueue(job);
    if (!status.ok()) return status;
    job_ = std::move(job);
    phase_ = Phase::kComputing;
    return absl::OkStatus();
  }

  // On the batcher's worker thread.
  void OnJobDone(AttentionJob& job) {
    Next next;
    {
      absl::MutexLock lock(&mu_);
      job_.reset();
      for (Input& in : inputs_) {  // inputs are no longer needed
        in.data.reset();
        charge_.Shrink(in.received);
      }
      const absl::Time now = service_->clock().Now();
      if (!pending_error_.ok()) {
        RequestFinishLocked(ToGrpcStatus(pending_error_), &next);
      } else if (!job.status.ok()) {
        RequestFinishLocked(FailedJobStatus(job, now, *context_, service_->draining()), &next);
      } else if (cancelled_ || context_->IsCancelled()) {
        RequestFinishLocked(CancelledCallStatus(job.deadline, now), &next);
      } else {
        phase_ = Phase::kSending;
        final_metrics_.set_request_id(request_id_);
        v1::AttentionMetrics* metrics = final_metrics_.mutable_metrics();
        FillAttentionMetrics(job, serving_->convert_options.backend_info.name, metrics);
        metrics->set_total_seconds(absl::ToDoubleSeconds(now - start_));
        if (spec_.metrics_only) {
          output_.reset();
        } else {
          v1::AttendStreamResponse spec_message;
          spec_message.set_request_id(request_id_);
          *spec_message.mutable_output_spec() = OutputSpec(spec_);
          writer_.PushMessage(std::move(spec_message));
          writer_.PushTensor(v1::TENSOR_NAME_OUTPUT, std::move(output_), spec_.q_bytes);
        }
        writer_.PushMessage(std::move(final_metrics_));
        WriteNextLocked(&next);
      }
    }
    Apply(next);
  }

  // The next queued message (output_spec, output chunks, metrics), then the status.
  void WriteNextLocked(Next* next) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (phase_ != Phase::kSending) return;
    if (writer_.Next(&response_)) {
      response_.set_request_id(request_id_);
      service_->metrics().AddSentBytes(static_cast<int64_t>(response_.ByteSizeLong()));
      write_in_flight_ = true;
      next->write = true;
      return;
    }
    RequestFinishLocked(grpc::Status::OK, next);
  }

  void ReleaseBuffersLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // Never while a job may still read or write them.
    if (job_ != nullptr) return;
    for (Input& in : inputs_) in.data.reset();
    output_.reset();
    writer_.Clear();
    charge_.Release();
  }

  AttentionServiceImpl* const service_;
  // Null while starting (Start refuses the call then, so nothing below runs); then fixed.
  const ServingState* const serving_;
  grpc::CallbackServerContext* const context_;
  CallerSlot caller_slot_;  // the caller's name and its --max_inflight_per_caller slot
  const absl::Time start_;

  absl::Mutex mu_;
  Phase phase_ ABSL_GUARDED_BY(mu_) = Phase::kHeader;
  v1::AttendStreamRequest request_;    // target of the one read in flight
  v1::AttendStreamResponse response_;  // source of the one write in flight
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  // An error seen while the job was queued or running: the status once it comes back.
  absl::Status pending_error_ ABSL_GUARDED_BY(mu_);
  // A status decided while a write was in flight: sent when it completes.
  std::optional<grpc::Status> pending_finish_ ABSL_GUARDED_BY(mu_);

  RequestSpec spec_ ABSL_GUARDED_BY(mu_);
  std::string request_id_ ABSL_GUARDED_BY(mu_);
  Input inputs_[3] ABSL_GUARDED_BY(mu_);    // q, k, v
  HostBuffer output_ ABSL_GUARDED_BY(mu_);  // like q; the writer's once computed
  v1::AttendStreamResponse final_metrics_ ABSL_GUARDED_BY(mu_);
  ChunkedTensorWriter<v1::AttendStreamResponse> writer_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<AttentionJob> job_ ABSL_GUARDED_BY(mu_);
  // Bytes of this call in the server's memory budget: inputs as received, then the output.
  MemoryCharge charge_ ABSL_GUARDED_BY(mu_);
  WatchedUpload upload_;
  bool watched_ = false;  // set in Start, before any reaction
};

}  // namespace

grpc::ServerBidiReactor<v1::AttendStreamRequest, v1::AttendStreamResponse>*
StartAttendStreamReactor(AttentionServiceImpl* service, grpc::CallbackServerContext* context) {
  auto* reactor = new AttendStreamReactor(service, context);
  reactor->Start();
  return reactor;
}

}  // namespace anchorserve
