#include "server/attend_reactor.h"

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "proto/anchorserve/v1/tensor_wire.h"
#include "server/attention_job.h"
#include "server/proto_convert.h"
#include "server/rpc_support.h"
#include "server/status_convert.h"

namespace anchorserve {
namespace {

constexpr int kRequestQField = v1::AttendRequest::kQFieldNumber;
constexpr int kRequestKField = v1::AttendRequest::kKFieldNumber;
constexpr int kRequestVField = v1::AttendRequest::kVFieldNumber;
constexpr int kResponseOutputField = v1::AttendResponse::kOutputFieldNumber;

// Alignment the compute may rely on for an input read in place from a received slice.
constexpr uintptr_t kInPlaceAlignment = 64;

// A received Attend request, split before its reactor exists (as gRPC would have parsed it):
// the tensor bytes stay where gRPC received them, or are copied once into one piece each.
struct ReceivedAttend {
  absl::Status status;         // INVALID_ARGUMENT when the message does not parse
  v1::AttendRequest head;      // the request without tensor bytes
  SplitMessage split;          // the tensor bytes where gRPC received them
  HostBuffer copies[3];        // q, k, v when not usable in place
  const char* inputs[3] = {};  // q, k, v in one piece each
  std::array<int64_t, 3> data_bytes{};
  int64_t copied_bytes = 0;  // of `copies`
};

// Copies take their blocks from `cache` when it holds one of their size: pages a previous
// request left resident, so the copy takes no page faults.
ReceivedAttend ReceiveAttend(const grpc::ByteBuffer& request, HostBufferCache* cache) {
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
    received.copies[i] = AllocateBytes(static_cast<int64_t>(data.size), cache);
    if (received.copies[i] == nullptr) {
      received.status = absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", data.size, " bytes for an input"));
      return received;
    }
    data.CopyTo(received.copies[i].get());
    received.copied_bytes += static_cast<int64_t>(data.size);
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
    if (grpc::Status refused = AdmissionStatus(*service_, serving_, *context_, &caller_slot_);
        !refused.ok()) {
      return FinishOnce(refused);
    }
    service_->metrics().AddReceivedBytes(static_cast<int64_t>(request_->Length()));
    if (!received_.status.ok()) return FinishOnce(ToGrpcStatus(received_.status));
    absl::StatusOr<RequestSpec> spec =
        SpecFromAttendRequest(received_.head, received_.data_bytes, serving_->convert_options);
    if (!spec.ok()) return FinishOnce(ToGrpcStatus(spec.status()));
    spec_ = *std::move(spec);
    // The received message (held until the call is done), copies of misaligned inputs and the
    // output (held until gRPC has sent it).
    absl::StatusOr<MemoryCharge> charge = service_->memory_budget().Charge(
        static_cast<int64_t>(request_->Length()) + received_.copied_bytes + spec_.q_bytes,
        "Attend request (message, input copies and output)");
    if (!charge.ok()) return FinishOnce(ToGrpcStatus(charge.status()));
    charge_ = *std::move(charge);
    const char* const* inputs = received_.inputs;
    if (absl::Status finite = CheckFiniteInputs(spec_, inputs[0], inputs[1], inputs[2]);
        !finite.ok()) {
      return FinishOnce(ToGrpcStatus(finite));
    }
    // Not zero-filled: the compute writes every element. It becomes the response's data slice.
    output_ = AllocateBytes(spec_.q_bytes, &service_->host_buffer_cache());
    if (output_ == nullptr) {
      return FinishOnce(ToGrpcStatus(absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", spec_.q_bytes, " bytes for the output"))));
    }
    // Compute reads the inputs in place (received slices or copies); they live until OnDone.
    std::shared_ptr<AttentionJob> job = MakeAttentionJob(spec_, inputs[0], inputs[1], inputs[2],
                                                         output_.get(), DeadlineOf(*context_));
    job->on_done = [this, done = job.get()] { OnJobDone(*done); };
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
      auto* owned = new HostBuffer(std::move(output_));
      AppendTensorData(kResponseOutputField,
                       grpc::Slice(
                           owned->get(), static_cast<size_t>(spec_.q_bytes),
                           [](void* buffer) { delete static_cast<HostBuffer*>(buffer); }, owned),
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
  HostBuffer output_;    // like q; handed to the response's slice
  MemoryCharge charge_;  // given back when the reactor is deleted (OnDone)
  absl::Mutex mu_;
  std::shared_ptr<AttentionJob> job_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

grpc::ServerUnaryReactor* StartAttendReactor(AttentionServiceImpl* service,
                                             grpc::CallbackServerContext* context,
                                             const grpc::ByteBuffer* request,
                                             grpc::ByteBuffer* response) {
  // Split (and copy) before the reactor counts the RPC in flight, as gRPC's own parsing did.
  auto* reactor = new AttendReactor(
      service, context, request, ReceiveAttend(*request, &service->host_buffer_cache()), response);
  reactor->Start();
  return reactor;
}

}  // namespace anchorserve
