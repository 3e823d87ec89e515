#include "server/rpc_support.h"

#include <chrono>
#include <new>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "server/status_convert.h"

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

}  // namespace

grpc::Status RefusalStatus(const AttentionServiceImpl& service, const ServingState* serving) {
  if (service.draining()) return DrainingStatus();
  if (serving == nullptr) return StartingStatus();
  return grpc::Status::OK;
}

grpc::Status AdmissionStatus(AttentionServiceImpl& service, const ServingState* serving,
                             const grpc::CallbackServerContext& context, CallerSlot* slot) {
  if (grpc::Status refused = RefusalStatus(service, serving); !refused.ok()) return refused;
  if (service.callers() == nullptr) return grpc::Status::OK;
  return service.callers()->Admit(context, slot);
}

absl::Time DeadlineOf(const grpc::CallbackServerContext& context) {
  const auto deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

grpc::Status CancelledCallStatus(absl::Time deadline, absl::Time now) {
  if (deadline <= now) {
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline passed during compute");
  }
  return grpc::Status(grpc::StatusCode::CANCELLED, "call cancelled by the client");
}

grpc::Status FailedJobStatus(const BatchJob& job, absl::Time now,
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

absl::Status ParseRawMessage(const grpc::ByteBuffer& buffer, absl::string_view what,
                             google::protobuf::Message* message) {
  grpc::ByteBuffer shared(buffer);  // another reference to the same slices, no copy
  grpc::ProtoBufferReader reader(&shared);
  if (!reader.status().ok() || !message->ParseFromZeroCopyStream(&reader)) {
    return absl::InvalidArgumentError(absl::StrCat(what, " does not parse as a ",
                                                   message->GetDescriptor()->full_name(), " (",
                                                   buffer.Length(), " bytes)"));
  }
  return absl::OkStatus();
}

void SerializeToByteBuffer(const google::protobuf::Message& message, grpc::ByteBuffer* buffer) {
  buffer->Clear();  // the previous message's (gRPC took its own reference when it was sent)
  bool own_buffer = false;
  // Fails only for a message over 2 GiB, which the send limits keep out.
  (void)grpc::SerializationTraits<google::protobuf::Message>::Serialize(message, buffer,
                                                                        &own_buffer);
}

absl::Status ParseRawMessageWithChunk(const grpc::ByteBuffer& buffer, absl::string_view what,
                                      int chunk_field, int data_field,
                                      google::protobuf::Message* message, SplitMessage* split,
                                      SegmentedBytes* chunk_data) {
  auto malformed = [&] {
    return absl::InvalidArgumentError(absl::StrCat(what, " does not parse as a ",
                                                   message->GetDescriptor()->full_name(), " (",
                                                   buffer.Length(), " bytes)"));
  };
  absl::StatusOr<SplitMessage> parts = SplitTensorData(buffer, {chunk_field}, data_field);
  if (!parts.ok()) return malformed();
  *split = *std::move(parts);
  if (!message->ParseFromString(split->rest)) return malformed();
  auto found = split->data.find(chunk_field);
  *chunk_data = found == split->data.end() ? SegmentedBytes{} : found->second;
  return absl::OkStatus();
}

void SerializeWithChunk(const google::protobuf::Message& message, int chunk_field, int data_field,
                        std::shared_ptr<const HostBuffer> owner, absl::string_view bytes,
                        grpc::ByteBuffer* buffer) {
  std::vector<grpc::Slice> slices;
  slices.emplace_back(message.SerializeAsString());
  if (!bytes.empty()) {
    using Share = std::shared_ptr<const HostBuffer>;
    auto* share = new Share(std::move(owner));
    // gRPC only reads the bytes; the slice API takes a non-const pointer.
    grpc::Slice data(
        const_cast<char*>(bytes.data()), bytes.size(),
        [](void* user_data) { delete static_cast<Share*>(user_data); }, share);
    AppendTensorData(chunk_field, std::move(data), &slices, data_field);
  }
  *buffer = grpc::ByteBuffer(slices.data(), slices.size());
}

TrackedUnaryReactor::TrackedUnaryReactor(AttentionServiceImpl* service, Rpc rpc)
    : service_(service),
      serving_(service->serving_state()),
      rpc_(rpc),
      start_(service->clock().Now()) {
  service_->RpcStarted();
}

void TrackedUnaryReactor::FinishOnce(const grpc::Status& status) {
  if (finished_.exchange(true)) return;
  service_->metrics().CountRequest(rpc_, status.error_code(), caller_slot_.caller());
  Finish(status);
}

void TrackedUnaryReactor::OnDone() {
  service_->metrics().ObserveRequestDuration(
      rpc_, absl::ToDoubleSeconds(service_->clock().Now() - start_));
  AttentionServiceImpl* service = service_;
  delete this;
  service->RpcDone();  // last: the service may be torn down once nothing is in flight
}

}  // namespace anchorserve
