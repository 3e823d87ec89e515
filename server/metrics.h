// The server's Prometheus metrics (names prefixed anchorserve_), on one prometheus::Registry.
// Constructed once in main and passed down; every family and label child is created here at
// start, so the hot paths only Increment/Observe/Set.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>

#include "grpcpp/support/status_code_enum.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace anchorserve {

enum class Rpc {
  kAttend,
  kAttendStream,
  kGetServerInfo,
  kPrefill,
  kGetModelInfo,
  kLast = kGetModelInfo
};
inline constexpr int kNumRpcs = static_cast<int>(Rpc::kLast) + 1;
// grpc::StatusCode values 0 (OK) .. 16 (UNAUTHENTICATED).
inline constexpr int kNumGrpcCodes = 17;

std::string_view RpcName(Rpc rpc);

// The batcher queues (label queue of anchorserve_queue_depth).
enum class Queue { kAttention, kPrefill };
inline constexpr int kNumQueues = 2;
std::string_view QueueName(Queue queue);  // "attention", "prefill"  // "Attend", "AttendStream",
                                          // "GetServerInfo", "Prefill", ...

// Why a call was refused or stopped for lack of room (label reason of anchorserve_refusals_total).
enum class Refusal {
  kMemoryBudget,  // --max_inflight_bytes would be exceeded
  kQueueFull,     // --max_queue_size requests already wait
  kDeadline,      // the work queued ahead would outlast the call's deadline
  kQueueTime,     // waited longer than --max_queue_time_ms
  kUploadStall,   // no message for --upload_stall_timeout_s during an upload
  kLast = kUploadStall
};
inline constexpr int kNumRefusals = static_cast<int>(Refusal::kLast) + 1;
// "memory_budget", "queue_full", "deadline", "queue_time", "upload_stall".
std::string_view RefusalName(Refusal reason);

class MetricsRegistry {
 public:
  MetricsRegistry();
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  // For the exposer (which keeps a weak_ptr) and for tests.
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // anchorserve_requests_total{rpc, code}: one finished RPC; with a `caller` (a token's name)
  // also anchorserve_caller_requests_total.
  void CountRequest(Rpc rpc, grpc::StatusCode code, const std::string& caller = std::string());
  // anchorserve_caller_requests_total{caller, rpc, code}: one finished RPC of a token's caller
  // (only with --auth_token_file; the names come from that file).
  void CountCallerRequest(const std::string& caller, Rpc rpc, grpc::StatusCode code);
  // anchorserve_unauthenticated_total: calls refused for a missing or unknown token.
  void CountUnauthenticated();
  // anchorserve_request_duration_seconds{rpc}: receipt to completion of one RPC.
  void ObserveRequestDuration(Rpc rpc, double seconds);
  // anchorserve_queue_duration_seconds: one request's wait in the batcher queue.
  void ObserveQueueDuration(double seconds);
  // anchorserve_compute_duration_seconds: one backend run of one batch.
  void ObserveComputeDuration(double seconds);
  // anchorserve_batch_size: requests per backend run.
  void ObserveBatchSize(int requests);
  // anchorserve_tokens_total: sequence tokens computed.
  void AddTokens(int64_t tokens);
  // anchorserve_density: computed fraction of the causal score matrix, per request.
  void ObserveDensity(double density);
  // anchorserve_mode_runs_total{mode, chosen_by}: successful requests by the mode they ran in
  // (anchor or dense) and who chose it (the request or its default, or mode auto).
  void CountModeRun(bool dense, bool chosen_by_auto);
  // anchorserve_queue_depth{queue}: requests waiting in a batcher queue.
  void SetQueueDepth(Queue queue, int64_t depth);
  // anchorserve_prefill_pending_kv_bytes: KV bytes computed and not yet handed to gRPC, over
  // all Prefill calls (what --prefill_buffer_bytes bounds per call).
  void AddPrefillPendingKvBytes(int64_t delta);
  // anchorserve_inflight_requests: RPCs started and not yet done.
  void RequestStarted();
  void RequestDone();
  // anchorserve_received_bytes_total / anchorserve_sent_bytes_total: serialized message bytes.
  void AddReceivedBytes(int64_t bytes);
  void AddSentBytes(int64_t bytes);
  // anchorserve_inflight_bytes / anchorserve_inflight_bytes_limit: what the memory budget holds
  // now and its size (--max_inflight_bytes, resolved).
  void AddInflightBytes(int64_t delta);
  void SetInflightBytesLimit(int64_t bytes);
  // anchorserve_pinned_host_bytes: host buffers page-locked for the GPU's copies
  // (--pin_host_buffers, and the CUDA prefill engine's K/V ring), cached or in use.
  void AddPinnedHostBytes(int64_t delta);
  // anchorserve_refusals_total{reason}: calls refused (or stopped) for lack of room.
  void CountRefusal(Refusal reason);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  // [rpc][code]
  std::array<std::array<prometheus::Counter*, kNumGrpcCodes>, kNumRpcs> requests_{};
  prometheus::Family<prometheus::Counter>* caller_requests_ = nullptr;
  prometheus::Counter* unauthenticated_ = nullptr;
  std::array<prometheus::Histogram*, kNumRpcs> request_duration_{};
  prometheus::Histogram* queue_duration_ = nullptr;
  prometheus::Histogram* compute_duration_ = nullptr;
  prometheus::Histogram* batch_size_ = nullptr;
  prometheus::Counter* tokens_ = nullptr;
  prometheus::Histogram* density_ = nullptr;
  std::array<std::array<prometheus::Counter*, 2>, 2> mode_runs_{};  // [dense][chosen_by_auto]
  std::array<prometheus::Gauge*, kNumQueues> queue_depth_{};
  prometheus::Gauge* prefill_pending_kv_bytes_ = nullptr;
  prometheus::Gauge* inflight_ = nullptr;
  prometheus::Counter* received_bytes_ = nullptr;
  prometheus::Counter* sent_bytes_ = nullptr;
  prometheus::Gauge* inflight_bytes_ = nullptr;
  prometheus::Gauge* inflight_bytes_limit_ = nullptr;
  prometheus::Gauge* pinned_host_bytes_ = nullptr;
  std::array<prometheus::Counter*, kNumRefusals> refusals_{};
};

}  // namespace anchorserve
