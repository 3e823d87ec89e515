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
#include "kernels/status_macros.h"
#include "server/attend_stream_assembler.h"
#include "server/attention_job.h"
#include "server/chunked_tensor_writer.h"
#include "server/proto_convert.h"
#include "server/rpc_support.h"
#include "server/status_convert.h"

namespace anchorserve {
namespace {

// What the assembler of a call refused at Start (no serving state yet) points at; never used.
const ConvertOptions kNoServingOptions;

// Where a chunk's bytes sit on the wire: split off the messages so that they are copied once.
constexpr int kRequestChunkField = v1::AttendStreamRequest::kChunkFieldNumber;
constexpr int kResponseChunkField = v1::AttendStreamResponse::kChunkFieldNumber;
constexpr int kChunkDataField = v1::TensorChunk::kDataFieldNumber;

class AttendStreamReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  AttendStreamReactor(AttentionServiceImpl* service, grpc::CallbackServerContext* context)
      : service_(service),
        serving_(service->serving_state()),
        context_(context),
        start_(service->clock().Now()),
        assembler_(serving_ != nullptr ? &serving_->convert_options : &kNoServingOptions,
                   &service->memory_budget(), &service->host_buffer_cache()),
        writer_(service->config().stream_chunk_bytes,
                [](int tag, int64_t offset, v1::AttendStreamResponse* out) {
                  v1::TensorChunk* chunk = out->mutable_chunk();
                  chunk->set_tensor(static_cast<v1::TensorName>(tag));
                  chunk->set_offset(offset);
                }),
        output_charge_(service->memory_budget().EmptyCharge()),
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
    StartRead(&request_buffer_);
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
                  : ToGrpcStatus(absl::InvalidArgumentError(assembler_.EndedEarlyMessage())),
              &next);
        }
      } else {
        service_->metrics().AddReceivedBytes(static_cast<int64_t>(request_buffer_.Length()));
        ++messages_received_;
        // A chunk's bytes go from gRPC's slices into the tensor buffer in one copy.
        SplitMessage split;
        SegmentedBytes chunk_data;
        absl::Status status = ParseRawMessageWithChunk(
            request_buffer_, absl::StrCat("message ", messages_received_, " of the stream"),
            kRequestChunkField, kChunkDataField, &request_, &split, &chunk_data);
        if (status.ok()) status = HandleMessageLocked(chunk_data);
        request_buffer_.Clear();
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

  // gRPC operations decided under the lock and started after it is released (a reaction may
  // run on another thread at once, and Finish may lead to OnDone deleting this reactor).
  struct Next {
    bool read = false;
    bool write = false;
    std::optional<grpc::Status> finish;
  };

  void Apply(Next& next) {
    if (next.finish.has_value()) return FinishNow(*next.finish);
    if (next.write) {
      // Serialized here, as gRPC would at StartWrite; the one write in flight owns response_ and
      // chunk_ (whose bytes gRPC sends from the output buffer, not copied).
      SerializeWithChunk(response_, kResponseChunkField, kChunkDataField, std::move(chunk_.owner),
                         chunk_.bytes, &response_buffer_);
      StartWrite(&response_buffer_);
    }
    if (next.read) StartRead(&request_buffer_);
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

  absl::Status HandleMessageLocked(const SegmentedBytes& chunk_data)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ANCHOR_RETURN_IF_ERROR(assembler_.Add(request_, &chunk_data));
    if (phase_ == Phase::kHeader && assembler_.header_received()) {
      spec_ = assembler_.spec();
      request_id_ = service_->RequestIdFor(assembler_.requested_id());
      phase_ = Phase::kReceiving;
    }
    if (phase_ == Phase::kReceiving && assembler_.complete()) return StartComputeLocked();
    return absl::OkStatus();
  }

  absl::Status StartComputeLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    upload_.Done();
    ANCHOR_RETURN_IF_ERROR(
        CheckFiniteInputs(spec_, assembler_.data(0), assembler_.data(1), assembler_.data(2)));
    if (absl::Status charged = output_charge_.Grow(spec_.q_bytes, "output"); !charged.ok()) {
      return charged;
    }
    output_ = AllocateBytes(spec_.q_bytes, &service_->host_buffer_cache());
    if (output_ == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", spec_.q_bytes, " bytes for the output"));
    }
    std::shared_ptr<AttentionJob> job =
        MakeAttentionJob(spec_, assembler_.data(0), assembler_.data(1), assembler_.data(2),
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
      assembler_.ReleaseData();  // inputs are no longer needed (their budget charge too)
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
    if (writer_.Next(&response_, &chunk_)) {
      response_.set_request_id(request_id_);
      service_->metrics().AddSentBytes(
          static_cast<int64_t>(response_.ByteSizeLong() + chunk_.bytes.size()));
      write_in_flight_ = true;
      next->write = true;
      return;
    }
    RequestFinishLocked(grpc::Status::OK, next);
  }

  void ReleaseBuffersLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // Never while a job may still read or write them.
    if (job_ != nullptr) return;
    assembler_.ReleaseData();
    output_.reset();
    writer_.Clear();
    output_charge_.Release();
  }

  AttentionServiceImpl* const service_;
  // Null while starting (Start refuses the call then, so nothing below runs); then fixed.
  const ServingState* const serving_;
  grpc::CallbackServerContext* const context_;
  CallerSlot caller_slot_;  // the caller's name and its --max_inflight_per_caller slot
  const absl::Time start_;

  absl::Mutex mu_;
  Phase phase_ ABSL_GUARDED_BY(mu_) = Phase::kHeader;
  grpc::ByteBuffer request_buffer_;  // target of the one read in flight
  int64_t messages_received_ ABSL_GUARDED_BY(mu_) = 0;
  v1::AttendStreamRequest request_ ABSL_GUARDED_BY(mu_);  // the last message read, parsed
  v1::AttendStreamResponse response_;                     // source of the one write in flight
  ChunkedTensorWriter<v1::AttendStreamResponse>::ChunkBytes chunk_;  // its chunk's bytes
  grpc::ByteBuffer response_buffer_;                                 // response_ serialized
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  // An error seen while the job was queued or running: the status once it comes back.
  absl::Status pending_error_ ABSL_GUARDED_BY(mu_);
  // A status decided while a write was in flight: sent when it completes.
  std::optional<grpc::Status> pending_finish_ ABSL_GUARDED_BY(mu_);

  RequestSpec spec_ ABSL_GUARDED_BY(mu_);
  std::string request_id_ ABSL_GUARDED_BY(mu_);
  AttendStreamAssembler assembler_ ABSL_GUARDED_BY(mu_);  // q, k, v as they arrive
  HostBuffer output_ ABSL_GUARDED_BY(mu_);                // like q; the writer's once computed
  v1::AttendStreamResponse final_metrics_ ABSL_GUARDED_BY(mu_);
  ChunkedTensorWriter<v1::AttendStreamResponse> writer_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<AttentionJob> job_ ABSL_GUARDED_BY(mu_);
  // The output's bytes in the server's memory budget (the assembler charges the inputs).
  MemoryCharge output_charge_ ABSL_GUARDED_BY(mu_);
  WatchedUpload upload_;
  bool watched_ = false;  // set in Start, before any reaction
};

}  // namespace

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* StartAttendStreamReactor(
    AttentionServiceImpl* service, grpc::CallbackServerContext* context) {
  auto* reactor = new AttendStreamReactor(service, context);
  reactor->Start();
  return reactor;
}

}  // namespace anchorserve
