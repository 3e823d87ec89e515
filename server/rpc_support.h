// Pieces every reactor of the server shares: why an arriving RPC is refused, how a failed job's
// status reads, the deadline of a call, allocation without zero-fill, and the unary reactor base
// that counts the RPC in flight and records its metrics.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "google/protobuf/message.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/server_callback.h"
#include "grpcpp/support/status.h"
#include "proto/anchorserve/v1/tensor_wire.h"
#include "server/attention_service.h"
#include "server/batch_job.h"
#include "server/host_buffer.h"
#include "server/metrics.h"

namespace anchorserve {

// Why an RPC that just arrived is refused (draining first: a server stopped during its startup
// never becomes ready); OK when it may go on. `serving` is the reactor's snapshot.
grpc::Status RefusalStatus(const AttentionServiceImpl& service, const ServingState* serving);

// RefusalStatus, then the caller's token and --max_inflight_per_caller (CallerGate): what every
// RPC of our services checks first. Fills `slot`, which the reactor keeps until it is destroyed.
grpc::Status AdmissionStatus(AttentionServiceImpl& service, const ServingState* serving,
                             const grpc::CallbackServerContext& context, CallerSlot* slot);

absl::Time DeadlineOf(const grpc::CallbackServerContext& context);

// Why a call whose job finished is dead anyway (the client already has its status).
grpc::Status CancelledCallStatus(absl::Time deadline, absl::Time now);

// The status of a job that did not succeed. A cancelled job reports why it was cancelled: its
// deadline passed (gRPC cancels the call then), or the drain gave up on it (the client may retry
// elsewhere).
grpc::Status FailedJobStatus(const BatchJob& job, absl::Time now,
                             const grpc::CallbackServerContext& context, bool draining);

// Parses a message of a raw (grpc::ByteBuffer) method. Our methods are raw so that a message that
// does not parse is INVALID_ARGUMENT naming `what`: gRPC 1.51's callback handlers answer a typed
// request that fails to parse with UNIMPLEMENTED and no message, and end a typed stream's reads
// as if the client had half-closed.
absl::Status ParseRawMessage(const grpc::ByteBuffer& buffer, absl::string_view what,
                             google::protobuf::Message* message);
// Serializes `message` into `buffer`, replacing what it held (gRPC's serializer needs an empty
// buffer).
void SerializeToByteBuffer(const google::protobuf::Message& message, grpc::ByteBuffer* buffer);

// ParseRawMessage for a stream message whose embedded message field `chunk_field` carries tensor
// bytes in its bytes field `data_field`: those bytes are left where gRPC received them
// (`*chunk_data`, empty when absent; they point into `*split`, which keeps them alive) and the
// rest is parsed into `message` (tensor_wire.h says how).
absl::Status ParseRawMessageWithChunk(const grpc::ByteBuffer& buffer, absl::string_view what,
                                      int chunk_field, int data_field,
                                      google::protobuf::Message* message, SplitMessage* split,
                                      SegmentedBytes* chunk_data);

// `message` serialized, then `bytes` as one more occurrence of its embedded message field
// `chunk_field` holding only bytes field `data_field`, into `buffer`. The bytes are not copied:
// gRPC sends them from where they lie, and the slice holds a share of `owner` until it has.
void SerializeWithChunk(const google::protobuf::Message& message, int chunk_field, int data_field,
                        std::shared_ptr<const HostBuffer> owner, absl::string_view bytes,
                        grpc::ByteBuffer* buffer);

// Base of the unary reactors: counts the RPC in flight, finishes it once, records its metrics.
class TrackedUnaryReactor : public grpc::ServerUnaryReactor {
 public:
  TrackedUnaryReactor(AttentionServiceImpl* service, Rpc rpc);

  const ServingState* serving() const { return serving_; }
  CallerSlot* caller_slot() { return &caller_slot_; }

  // Only the first call finishes the RPC.
  void FinishOnce(const grpc::Status& status);
  void OnDone() override;

 protected:
  AttentionServiceImpl* const service_;
  const ServingState* const serving_;  // null while starting; then fixed for the call
  const Rpc rpc_;
  const absl::Time start_;
  CallerSlot caller_slot_;

 private:
  std::atomic<bool> finished_{false};
};

}  // namespace anchorserve
