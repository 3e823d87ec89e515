#include "server/attention_service.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <optional>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "proto/anchorserve/v1/tensor_wire.h"
#include "server/status_convert.h"

#ifndef ANCHOR_VERSION
#define ANCHOR_VERSION "unknown"
#endif

namespace anchorserve {
namespace {

const grpc::Status& DrainingStatus() {
  static const auto* status = new grpc::Status(grpc::StatusCode::UNAVAILABLE, "server is draining");
  return *status;
}

// Before SetReady: the port listens while the backend is being created.
const grpc::Status& StartingStatus() {
  static const auto* status = new grpc::Status(grpc::StatusCode::UNAVAILABLE, "server is starting");
  return *status;
}

// Why an RPC that just arrived is refused (draining first: a server stopped during its startup
// never becomes ready); OK when it may go on. `serving` is the reactor's snapshot.
grpc::Status RefusalStatus(const AttentionServiceImpl& service, const ServingState* serving) {
  if (service.draining()) return DrainingStatus();
  if (serving == nullptr) return StartingStatus();
  return grpc::Status::OK;
}

absl::Time DeadlineOf(const grpc::CallbackServerContext& context) {
  const auto deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

// Why a call whose job finished is dead anyway (the client already has its status).
grpc::Status CancelledCallStatus(absl::Time deadline, absl::Time now) {
  if (deadline <= now) {
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline passed during compute");
  }
  return grpc::Status(grpc::StatusCode::CANCELLED, "call cancelled by the client");
}

// The status of a job that did not succeed. A cancelled job reports why it was cancelled: its
// deadline passed (gRPC cancels the call then), or the drain gave up on it (the client may retry
// elsewhere).
grpc::Status FailedJobStatus(const AttentionJob& job, absl::Time now,
                             const grpc::CallbackServerContext& context, bool draining) {
  if (job.status.code() == absl::StatusCode::kCancelled) {
    if (job.deadline <= now) {
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline passed during compute");
    }
    if (draining && !context.IsCancelled()) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "server is draining and --drain_timeout_s ran out before this request "
                          "finished");
    }
  }
  return ToGrpcStatus(job.status);
}

// Heap memory without zero-filling it; null when the allocation fails.
std::unique_ptr<char[]> AllocateBytes(int64_t bytes) {
  return std::unique_ptr<char[]>(new (std::nothrow) char[static_cast<size_t>(bytes)]);
}

// Base of the unary reactors: counts the RPC in flight, finishes it once, records its metrics.
class TrackedUnaryReactor : public grpc::ServerUnaryReactor {
 public:
  TrackedUnaryReactor(AttentionServiceImpl* service, Rpc rpc)
      : service_(service),
        serving_(service->serving_state()),
        rpc_(rpc),
        start_(service->clock().Now()) {
    service_->RpcStarted();
  }

  const ServingState* serving() const { return serving_; }

  // Only the first call finishes the RPC.
  void FinishOnce(const grpc::Status& status) {
    if (finished_.exchange(true)) return;
    service_->metrics().CountRequest(rpc_, status.error_code());
    Finish(status);
  }

  void OnDone() override {
    service_->metrics().ObserveRequestDuration(
        rpc_, absl::ToDoubleSeconds(service_->clock().Now() - start_));
    AttentionServiceImpl* service = service_;
    delete this;
    service->RpcDone();  // last: the service may be torn down once nothing is in flight
  }

 protected:
  AttentionServiceImpl* const service_;
  const ServingState* const serving_;  // null while starting; then fixed for the call
  const Rpc rpc_;
  const absl::Time start_;

 private:
  std::atomic<bool> finished_{false};
};

// Field numbers of the tensors in AttendRequest and AttendResponse.
constexpr int kRequestQField = 2;
constexpr int kRequestKField = 3;
constexpr int kRequestVField = 4;
constexpr int kResponseOutputField = 2;

// Alignment the compute may rely on for an input read in place from a received slice.
constexpr uintptr_t kInPlaceAlignment = 64;

// A received Attend request, split before its reactor exists (as gRPC would have parsed it):
// the tensor bytes stay where gRPC received them, or are copied once into one piece each.
struct ReceivedAttend {
  absl::Status status;                // INVALID_ARGUMENT when the message does not parse
  v1::AttendRequest head;             // the request without tensor bytes
  SplitMessage split;                 // the tensor bytes where gRPC received them
  std::unique_ptr<char[]> copies[3];  // q, k, v when not usable in place
  const char* inputs[3] = {};         // q, k, v in one piece each
  std::array<int64_t, 3> data_bytes{};
};

ReceivedAttend ReceiveAttend(const grpc::ByteBuffer& request) {
  ReceivedAttend received;
  const int fields[3] = {kRequestQField, kRequestKField, kRequestVField};
  absl::StatusOr<SplitMessage> split = SplitTensorData(request, fields);
  if (!split.ok() || !received.head.ParseFromString(split->rest)) {
    received.status = absl::InvalidArgumentError(
        absl::StrCat("request does not parse as an AttendRequest",
                     split.ok() ? "" : absl::StrCat(": ", split.status().message())));
    return received;
  }
  received.split = *std::move(split);
  for (int i = 0; i < 3; ++i) {
    const auto found = received.split.data.find(fields[i]);
    if (found == received.split.data.end()) continue;  // validation reports the missing bytes
    const SegmentedBytes& data = found->second;
    received.data_bytes[i] = static_cast<int64_t>(data.size);
    if (data.pieces.size() == 1 &&
        reinterpret_cast<uintptr_t>(data.pieces[0].data()) % kInPlaceAlignment == 0) {
      received.inputs[i] = data.pieces[0].data();
      continue;
    }
    // At most the size of the message gRPC already accepted.
    received.copies[i] = AllocateBytes(static_cast<int64_t>(data.size));
    if (received.copies[i] == nullptr) {
      received.status = absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", data.size, " bytes for an input"));
      return received;
    }
    data.CopyTo(received.copies[i].get());
    received.inputs[i] = received.copies[i].get();
  }
  return received;
}

class AttendReactor final : public TrackedUnaryReactor {
 public:
  AttendReactor(AttentionServiceImpl* service, grpc::CallbackServerContext* context,
                const grpc::ByteBuffer* request, ReceivedAttend received,
                grpc::ByteBuffer* response)
      : TrackedUnaryReactor(service, Rpc::kAttend),
        context_(context),
        request_(request),
        received_(std::move(received)),
        response_(response) {}

  void Start() {
    if (grpc::Status refused = RefusalStatus(*service_, serving_); !refused.ok()) {
      return FinishOnce(refused);
    }
    service_->metrics().AddReceivedBytes(static_cast<int64_t>(request_->Length()));
    if (!received_.status.ok()) return FinishOnce(ToGrpcStatus(received_.status));
    absl::StatusOr<RequestSpec> spec =
        SpecFromAttendRequest(received_.head, received_.data_bytes, serving_->convert_options);
    if (!spec.ok()) return FinishOnce(ToGrpcStatus(spec.status()));
    spec_ = *std::move(spec);
    const char* const* inputs = received_.inputs;

    auto job = std::make_shared<AttentionJob>();
    ApplySpec(spec_, &job->task);
    // Compute reads the inputs in place (received slices or copies); they live until OnDone.
    job->task.q = inputs[0];
    job->task.k = inputs[1];
    job->task.v = inputs[2];
    // Not zero-filled: the compute writes every element. It becomes the response's data slice.
    output_ = AllocateBytes(spec_.q_bytes);
    if (output_ == nullptr) {
      return FinishOnce(ToGrpcStatus(absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", spec_.q_bytes, " bytes for the output"))));
    }
    job->task.out = output_.get();
    job->deadline = DeadlineOf(*context_);
    job->compute_recall = spec_.compute_recall;
    job->on_done = [this](AttentionJob& done) { OnJobDone(done); };
    {
      absl::MutexLock lock(&mu_);
      job_ = job;
    }
    if (absl::Status status = serving_->batcher->Enqueue(std::move(job)); !status.ok()) {
      FinishOnce(ToGrpcStatus(status));
    }
  }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    if (job_ == nullptr) return;  // never queued (refused, or not yet)
    job_->cancelled.store(true);
    serving_->batcher->Wake();
  }

 private:
  // On the batcher's worker thread.
  void OnJobDone(AttentionJob& job) {
    const absl::Time now = service_->clock().Now();
    if (!job.status.ok()) {
      return FinishOnce(FailedJobStatus(job, now, *context_, service_->draining()));
    }
    if (context_->IsCancelled()) return FinishOnce(CancelledCallStatus(job.deadline, now));
    // The inputs are no longer needed; free them before the response goes out.
    const std::string request_id = service_->RequestIdFor(received_.head.request_id());
    received_ = ReceivedAttend();

    v1::AttendResponse head;
    head.set_request_id(request_id);
    if (!spec_.metrics_only) SetOutputTensorSpec(spec_, head.mutable_output());
    v1::AttentionMetrics* metrics = head.mutable_metrics();
    FillAttentionMetrics(job, serving_->convert_options.backend_info.name, metrics);
    metrics->set_total_seconds(absl::ToDoubleSeconds(now - start_));
    std::vector<grpc::Slice> slices;
    slices.emplace_back(head.SerializeAsString());
    if (!spec_.metrics_only) {
      // The slice owns the output from here on and frees it once gRPC has written it.
      AppendTensorData(kResponseOutputField,
                       grpc::Slice(output_.release(), static_cast<size_t>(spec_.q_bytes),
                                   [](void* bytes) { delete[] static_cast<char*>(bytes); }),
                       &slices);
    }
    *response_ = grpc::ByteBuffer(slices.data(), slices.size());
    service_->metrics().AddSentBytes(static_cast<int64_t>(response_->Length()));
    FinishOnce(grpc::Status::OK);
  }

  grpc::CallbackServerContext* const context_;
  const grpc::ByteBuffer* const request_;
  ReceivedAttend received_;  // read by the job until it is done
  grpc::ByteBuffer* const response_;
  RequestSpec spec_;
  std::unique_ptr<char[]> output_;  // like q; handed to the response's slice
  absl::Mutex mu_;
  std::shared_ptr<AttentionJob> job_ ABSL_GUARDED_BY(mu_);
};

class AttendStreamReactor final
    : public grpc::ServerBidiReactor<v1::AttendStreamRequest, v1::AttendStreamResponse> {
 public:
  AttendStreamReactor(AttentionServiceImpl* service, grpc::CallbackServerContext* context)
      : service_(service),
        serving_(service->serving_state()),
        context_(context),
        start_(service->clock().Now()) {
    service_->RpcStarted();
  }

  void Start() {
    if (grpc::Status refused = RefusalStatus(*service_, serving_); !refused.ok()) {
      {
        absl::MutexLock lock(&mu_);
        phase_ = Phase::kFinished;
      }
      return FinishNow(refused);
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
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
    std::unique_ptr<char[]> data;
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

  void FinishNow(const grpc::Status& status) {
    service_->metrics().CountRequest(Rpc::kAttendStream, status.error_code());
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
    request_id_ = service_->RequestIdFor(header.request_id());
    const int64_t sizes[3] = {spec_.q_bytes, spec_.k_bytes, spec_.v_bytes};
    const absl::string_view names[3] = {"q", "k", "v"};
    for (int i = 0; i < 3; ++i) {
      inputs_[i].name = names[i];
      inputs_[i].size = sizes[i];
      inputs_[i].received = 0;
      inputs_[i].data = AllocateBytes(sizes[i]);
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
    output_ = AllocateBytes(spec_.q_bytes);
    if (output_ == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", spec_.q_bytes, " bytes for the output"));
    }
    auto job = std::make_shared<AttentionJob>();
    ApplySpec(spec_, &job->task);
    job->task.q = inputs_[0].data.get();
    job->task.k = inputs_[1].data.get();
    job->task.v = inputs_[2].data.get();
    job->task.out = output_.get();
    job->deadline = DeadlineOf(*context_);
    job->compute_recall = spec_.compute_recall;
    job->on_done = [this](AttentionJob& done) { OnJobDone(done); };
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
      for (Input& in : inputs_) in.data.reset();  // inputs are no longer needed
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
          StartWriteLocked(std::move(final_metrics_), &next);
          metrics_queued_ = true;
        } else {
          v1::AttendStreamResponse spec_message;
          spec_message.set_request_id(request_id_);
          *spec_message.mutable_output_spec() = OutputSpec(spec_);
          StartWriteLocked(std::move(spec_message), &next);
        }
      }
    }
    Apply(next);
  }

  void StartWriteLocked(v1::AttendStreamResponse message, Next* next)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    response_ = std::move(message);
    service_->metrics().AddSentBytes(static_cast<int64_t>(response_.ByteSizeLong()));
    write_in_flight_ = true;
    next->write = true;
  }

  // The next output chunk, then the metrics, then the status.
  void WriteNextLocked(Next* next) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (phase_ != Phase::kSending) return;
    if (!spec_.metrics_only && output_sent_ < spec_.q_bytes) {
      const int64_t bytes =
          std::min(service_->config().stream_chunk_bytes, spec_.q_bytes - output_sent_);
      // Reuse the message (and its string's capacity) chunk after chunk.
      response_.set_request_id(request_id_);
      v1::TensorChunk* chunk = response_.mutable_chunk();
      chunk->set_tensor(v1::TENSOR_NAME_OUTPUT);
      chunk->set_offset(output_sent_);
      chunk->mutable_data()->assign(output_.get() + output_sent_, static_cast<size_t>(bytes));
      output_sent_ += bytes;
      service_->metrics().AddSentBytes(static_cast<int64_t>(response_.ByteSizeLong()));
      write_in_flight_ = true;
      next->write = true;
      return;
    }
    if (!metrics_queued_) {
      output_.reset();
      metrics_queued_ = true;
      StartWriteLocked(std::move(final_metrics_), next);
      return;
    }
    RequestFinishLocked(grpc::Status::OK, next);
  }

  void ReleaseBuffersLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // Never while a job may still read or write them.
    if (job_ != nullptr) return;
    for (Input& in : inputs_) in.data.reset();
    output_.reset();
  }

  AttentionServiceImpl* const service_;
  // Null while starting (Start refuses the call then, so nothing below runs); then fixed.
  const ServingState* const serving_;
  grpc::CallbackServerContext* const context_;
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
  Input inputs_[3] ABSL_GUARDED_BY(mu_);                 // q, k, v
  std::unique_ptr<char[]> output_ ABSL_GUARDED_BY(mu_);  // like q
  int64_t output_sent_ ABSL_GUARDED_BY(mu_) = 0;
  v1::AttendStreamResponse final_metrics_ ABSL_GUARDED_BY(mu_);
  bool metrics_queued_ ABSL_GUARDED_BY(mu_) = false;
  std::shared_ptr<AttentionJob> job_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::string_view ServerVersion() { return ANCHOR_VERSION; }

AttentionServiceImpl::AttentionServiceImpl(const ServerConfig& config, MetricsRegistry* metrics,
                                           Clock* clock)
    : config_(config),
      metrics_(metrics),
      clock_(clock),
      request_id_prefix_(std::random_device{}()) {}

absl::Status AttentionServiceImpl::SetReady(AttentionBackend* backend, DynamicBatcher* batcher) {
  if (backend == nullptr || batcher == nullptr) {
    return absl::InvalidArgumentError("SetReady needs a backend and a batcher");
  }
  absl::MutexLock lock(&ready_mu_);
  if (owned_serving_ != nullptr) return absl::FailedPreconditionError("SetReady called twice");
  auto state = std::make_unique<ServingState>();
  state->backend = backend;
  state->batcher = batcher;
  state->convert_options = MakeConvertOptions(config_, backend);
  owned_serving_ = std::move(state);
  // Release: a reactor that sees the pointer (acquire) sees the fully built state.
  serving_.store(owned_serving_.get(), std::memory_order_release);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Attend(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request,
                                                       grpc::ByteBuffer* response) {
  // Split (and copy) before the reactor counts the RPC in flight, as gRPC's own parsing did.
  auto* reactor = new AttendReactor(this, context, request, ReceiveAttend(*request), response);
  reactor->Start();
  return reactor;
}

grpc::ServerBidiReactor<v1::AttendStreamRequest, v1::AttendStreamResponse>*
AttentionServiceImpl::AttendStream(grpc::CallbackServerContext* context) {
  auto* reactor = new AttendStreamReactor(this, context);
  reactor->Start();
  return reactor;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::GetServerInfo(
    grpc::CallbackServerContext* context, const v1::GetServerInfoRequest* request,
    v1::GetServerInfoResponse* response) {
  auto* reactor = new TrackedUnaryReactor(this, Rpc::kGetServerInfo);
  if (grpc::Status refused = RefusalStatus(*this, reactor->serving()); !refused.ok()) {
    reactor->FinishOnce(refused);
    return reactor;
  }
  const BackendInfo& info = reactor->serving()->convert_options.backend_info;
  response->set_version(std::string(ServerVersion()));
  response->set_backend(info.name);
  response->set_device(info.device);
  for (DType dtype : info.dtypes) response->add_supported_dtypes(DTypeToProto(dtype));
  for (int head_dim : info.head_dims) response->add_supported_head_dims(head_dim);
  v1::ServerLimits* limits = response->mutable_limits();
  limits->set_max_message_bytes(config_.max_message_bytes);
  limits->set_max_request_bytes(config_.max_request_bytes);
  limits->set_max_seq_len(config_.max_seq_len);
  limits->set_max_heads(config_.max_heads);
  limits->set_max_batch_requests(config_.max_batch_requests);
  limits->set_max_batch_tokens(config_.max_batch_tokens);
  limits->set_max_queue_size(config_.max_queue_size);
  limits->set_max_queue_delay_seconds(absl::ToDoubleSeconds(config_.max_queue_delay));
  limits->set_stream_chunk_bytes(config_.stream_chunk_bytes);
  *response->mutable_defaults() = AnchorConfigToProto(config_.defaults);
  metrics_->AddSentBytes(static_cast<int64_t>(response->ByteSizeLong()));
  reactor->FinishOnce(grpc::Status::OK);
  return reactor;
}

bool AttentionServiceImpl::WaitUntilIdle(absl::Time deadline) {
  absl::MutexLock lock(&inflight_mu_);
  while (inflight_ > 0) {
    if (idle_.WaitWithDeadline(&inflight_mu_, deadline)) return inflight_ == 0;
  }
  return true;
}

int64_t AttentionServiceImpl::InflightRpcs() const {
  absl::MutexLock lock(&inflight_mu_);
  return inflight_;
}

void AttentionServiceImpl::RpcStarted() {
  metrics_->RequestStarted();
  absl::MutexLock lock(&inflight_mu_);
  ++inflight_;
}

void AttentionServiceImpl::RpcDone() {
  metrics_->RequestDone();
  absl::MutexLock lock(&inflight_mu_);
  if (--inflight_ == 0) idle_.SignalAll();
}

std::string AttentionServiceImpl::RequestIdFor(const std::string& requested) {
  if (!requested.empty()) return requested;
  return absl::StrFormat("req-%08x-%d", request_id_prefix_ & 0xffffffffu,
                         next_request_id_.fetch_add(1));
}

}  // namespace anchorserve
