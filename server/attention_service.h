// anchorserve.v1.AttentionService on gRPC's callback API.
//
// Attend (unary): validate (proto_convert), queue in the batcher, answer from the worker thread.
// The job computes straight from the request's bytes into the response's output buffer.
//
// AttendStream (bidi), for requests of any size up to --max_request_bytes:
//   client: one `header` (TensorSpecs, config, options), then `chunk`s of Q, K and V in any
//           interleaving, each tensor's chunks in order (offset == bytes of that tensor received
//           so far). Compute starts as soon as every byte has arrived; the client may half-close
//           then or later.
//   server: `output_spec`, output `chunk`s of at most --stream_chunk_bytes in order, then
//           `metrics` last, then status OK. With options.metrics_only only `metrics` is sent.
//   Errors end the stream with a status: INVALID_ARGUMENT for a first message that is not a
//   header, a second header, an out-of-order chunk, bytes beyond a tensor's size, or a stream
//   that ends before all bytes arrived; RESOURCE_EXHAUSTED for sizes over limits, checked from
//   the header before anything is allocated.
//
// GetServerInfo: version, backend, device, dtypes, head dims, limits, defaults.
//
// The service exists (and the port listens) before the backend does: until SetReady every RPC
// gets UNAVAILABLE "server is starting" (clients may retry). While draining every new RPC gets
// UNAVAILABLE "server is draining".
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "anchorserve/v1/anchorserve.grpc.pb.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/server_callback.h"
#include "kernels/backend.h"
#include "server/auth_tokens.h"
#include "server/batcher.h"
#include "server/clock.h"
#include "server/host_buffer.h"
#include "server/memory_budget.h"
#include "server/metrics.h"
#include "server/proto_convert.h"
#include "server/server_config.h"
#include "server/upload_watchdog.h"

namespace anchorserve {

inline constexpr char kAttentionServiceName[] = "anchorserve.v1.AttentionService";

// The server's version (the CMake project version).
absl::string_view ServerVersion();

// What serving needs from the backend; published once by SetReady and never changed after.
struct ServingState {
  AttentionBackend* backend = nullptr;
  DynamicBatcher* batcher = nullptr;
  ConvertOptions convert_options;  // limits, defaults and the backend's capabilities
};

// Every method is raw (grpc::ByteBuffer); on the wire they are the same messages. Attend: the
// server takes the tensor bytes out of the received message and puts the output into the response
// without protobuf's copies (tensor_wire.h). All of them: a message that does not parse is
// INVALID_ARGUMENT naming the message (rpc_support.h, ParseRawMessage), where gRPC's typed
// handlers would answer UNIMPLEMENTED or end the stream as if the client had half-closed.
using AttentionServiceBase = v1::AttentionService::WithRawCallbackMethod_Attend<
    v1::AttentionService::WithRawCallbackMethod_AttendStream<
        v1::AttentionService::WithRawCallbackMethod_GetServerInfo<v1::AttentionService::Service>>>;

class AttentionServiceImpl final : public AttentionServiceBase {
 public:
  // Everything passed in must outlive the service (and the gRPC server it is registered with).
  // `callers` (null: no authentication) checks tokens and per-caller limits.
  AttentionServiceImpl(const ServerConfig& config, MetricsRegistry* metrics, Clock* clock,
                       CallerGate* callers = nullptr);

  // The backend exists and the batcher runs: RPCs that start from now on are served. Both must
  // outlive the service. FAILED_PRECONDITION when called again.
  absl::Status SetReady(AttentionBackend* backend, DynamicBatcher* batcher);
  // Null until SetReady; the pointee never changes once published.
  const ServingState* serving_state() const { return serving_.load(std::memory_order_acquire); }

  grpc::ServerUnaryReactor* Attend(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* AttendStream(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const grpc::ByteBuffer* request,
                                          grpc::ByteBuffer* response) override;

  // From now on new RPCs are refused with UNAVAILABLE; RPCs already started go on.
  void StartDraining() { draining_.store(true); }
  bool draining() const { return draining_.load(); }

  // Waits until no RPC is in flight; false when `deadline` came first.
  bool WaitUntilIdle(absl::Time deadline);
  int64_t InflightRpcs() const;

  // --- for the reactors (attention_service.cc) ---
  const ServerConfig& config() const { return config_; }
  MetricsRegistry& metrics() { return *metrics_; }
  Clock& clock() { return *clock_; }
  // Shared by every call of both services (Prefill's KV buffers too).
  MemoryBudget& memory_budget() { return memory_budget_; }
  UploadWatchdog& upload_watchdog() { return upload_watchdog_; }
  // Freed tensor buffers kept for reuse (a quarter of the memory budget at most).
  HostBufferCache& host_buffer_cache() { return host_buffer_cache_; }
  CallerGate* callers() { return callers_; }
  void RpcStarted();
  void RpcDone();
  // `requested` when non-empty, else a new id unique within this process ("req-<hex>-<n>").
  std::string RequestIdFor(const std::string& requested);

 private:
  const ServerConfig config_;
  MetricsRegistry* const metrics_;
  Clock* const clock_;
  CallerGate* const callers_;
  const uint64_t request_id_prefix_;
  std::atomic<uint64_t> next_request_id_{1};
  std::atomic<bool> draining_{false};
  MemoryBudget memory_budget_;
  UploadWatchdog upload_watchdog_;
  HostBufferCache host_buffer_cache_;

  absl::Mutex ready_mu_;  // serializes SetReady
  std::unique_ptr<const ServingState> owned_serving_ ABSL_GUARDED_BY(ready_mu_);
  std::atomic<const ServingState*> serving_{nullptr};  // owned_serving_, once published

  mutable absl::Mutex inflight_mu_;
  absl::CondVar idle_;
  int64_t inflight_ ABSL_GUARDED_BY(inflight_mu_) = 0;
};

}  // namespace anchorserve
