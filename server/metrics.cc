#include "server/metrics.h"

#include <string>

#include "server/status_convert.h"

namespace anchorserve {
namespace {

// Latencies from sub-millisecond decode-size requests to minutes-long 256k prefills on CPU.
const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* buckets = new prometheus::Histogram::BucketBoundaries{
      0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
      0.5,    1,     2.5,    5,     10,   30,    60,   120, 300};
  return *buckets;
}

const prometheus::Histogram::BucketBoundaries& QueueBuckets() {
  static const auto* buckets = new prometheus::Histogram::BucketBoundaries{
      0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025,
      0.05,   0.1,     0.25,   0.5,   1,     2.5,   5,    10};
  return *buckets;
}

}  // namespace

std::string_view QueueName(Queue queue) {
  return queue == Queue::kPrefill ? "prefill" : "attention";
}

std::string_view RefusalName(Refusal reason) {
  switch (reason) {
    case Refusal::kMemoryBudget:
      return "memory_budget";
    case Refusal::kQueueFull:
      return "queue_full";
    case Refusal::kDeadline:
      return "deadline";
    case Refusal::kQueueTime:
      return "queue_time";
    case Refusal::kUploadStall:
      return "upload_stall";
  }
  return "unknown";
}

std::string_view RpcName(Rpc rpc) {
  switch (rpc) {
    case Rpc::kAttend:
      return "Attend";
    case Rpc::kAttendStream:
      return "AttendStream";
    case Rpc::kPrefill:
      return "Prefill";
    case Rpc::kGetModelInfo:
      return "GetModelInfo";
    case Rpc::kGetServerInfo:
      return "GetServerInfo";
  }
  return "unknown";
}

MetricsRegistry::MetricsRegistry() : registry_(std::make_shared<prometheus::Registry>()) {
  auto& requests = prometheus::BuildCounter()
                       .Name("anchorserve_requests_total")
                       .Help("Finished RPCs by method and gRPC status code.")
                       .Register(*registry_);
  auto& request_duration = prometheus::BuildHistogram()
                               .Name("anchorserve_request_duration_seconds")
                               .Help("Time from receiving an RPC to finishing it.")
                               .Register(*registry_);
  for (int r = 0; r < kNumRpcs; ++r) {
    const std::string rpc(RpcName(static_cast<Rpc>(r)));
    for (int c = 0; c < kNumGrpcCodes; ++c) {
      const std::string code(GrpcCodeName(static_cast<grpc::StatusCode>(c)));
      requests_[r][c] = &requests.Add({{"rpc", rpc}, {"code", code}});
    }
    request_duration_[r] = &request_duration.Add({{"rpc", rpc}}, LatencyBuckets());
  }
  caller_requests_ = &prometheus::BuildCounter()
                          .Name("anchorserve_caller_requests_total")
                          .Help(
                              "Finished RPCs by token name (--auth_token_file), method and "
                              "gRPC status code.")
                          .Register(*registry_);
  unauthenticated_ = &prometheus::BuildCounter()
                          .Name("anchorserve_unauthenticated_total")
                          .Help("Calls refused with UNAUTHENTICATED: no or an unknown token.")
                          .Register(*registry_)
                          .Add({});
  queue_duration_ = &prometheus::BuildHistogram()
                         .Name("anchorserve_queue_duration_seconds")
                         .Help("Time a request waited in the batcher queue.")
                         .Register(*registry_)
                         .Add({}, QueueBuckets());
  compute_duration_ = &prometheus::BuildHistogram()
                           .Name("anchorserve_compute_duration_seconds")
                           .Help("Wall time of one backend run (one batch, sparse pass).")
                           .Register(*registry_)
                           .Add({}, LatencyBuckets());
  batch_size_ = &prometheus::BuildHistogram()
                     .Name("anchorserve_batch_size")
                     .Help("Requests per backend run.")
                     .Register(*registry_)
                     .Add({}, prometheus::Histogram::BucketBoundaries{1, 2, 3, 4, 6, 8, 12, 16, 24,
                                                                      32, 48, 64, 128});
  tokens_ = &prometheus::BuildCounter()
                 .Name("anchorserve_tokens_total")
                 .Help("Sequence tokens computed (sum of seq_len of successful requests).")
                 .Register(*registry_)
                 .Add({});
  density_ = &prometheus::BuildHistogram()
                  .Name("anchorserve_density")
                  .Help("Computed fraction of the causal score matrix, per request.")
                  .Register(*registry_)
                  .Add({}, prometheus::Histogram::BucketBoundaries{0.01, 0.02, 0.05, 0.1, 0.2, 0.3,
                                                                   0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
                                                                   0.95, 0.99, 1.0});
  auto& mode_runs = prometheus::BuildCounter()
                        .Name("anchorserve_mode_runs_total")
                        .Help(
                            "Successful Attend, AttendStream and Prefill requests by the mode "
                            "they ran in and whether mode auto chose it.")
                        .Register(*registry_);
  for (int dense = 0; dense < 2; ++dense) {
    for (int by_auto = 0; by_auto < 2; ++by_auto) {
      mode_runs_[dense][by_auto] = &mode_runs.Add(
          {{"mode", dense ? "dense" : "anchor"}, {"chosen_by", by_auto ? "auto" : "request"}});
    }
  }
  auto& queue_depth = prometheus::BuildGauge()
                          .Name("anchorserve_queue_depth")
                          .Help("Requests waiting in a batcher queue.")
                          .Register(*registry_);
  for (int q = 0; q < kNumQueues; ++q) {
    queue_depth_[q] = &queue_depth.Add({{"queue", std::string(QueueName(static_cast<Queue>(q)))}});
  }
  prefill_pending_kv_bytes_ = &prometheus::BuildGauge()
                                   .Name("anchorserve_prefill_pending_kv_bytes")
                                   .Help("KV bytes of Prefill calls computed and not yet sent.")
                                   .Register(*registry_)
                                   .Add({});
  pinned_host_bytes_ =
      &prometheus::BuildGauge()
           .Name("anchorserve_pinned_host_bytes")
           .Help(
               "Host buffers page-locked for the GPU's copies (--pin_host_buffers, and the "
               "CUDA prefill engine's K/V ring), cached or in use.")
           .Register(*registry_)
           .Add({});
  inflight_ = &prometheus::BuildGauge()
                   .Name("anchorserve_inflight_requests")
                   .Help("RPCs started and not yet finished.")
                   .Register(*registry_)
                   .Add({});
  received_bytes_ = &prometheus::BuildCounter()
                         .Name("anchorserve_received_bytes_total")
                         .Help("Serialized bytes of request messages received.")
                         .Register(*registry_)
                         .Add({});
  sent_bytes_ = &prometheus::BuildCounter()
                     .Name("anchorserve_sent_bytes_total")
                     .Help("Serialized bytes of response messages sent.")
                     .Register(*registry_)
                     .Add({});
  inflight_bytes_ = &prometheus::BuildGauge()
                         .Name("anchorserve_inflight_bytes")
                         .Help(
                             "Request bytes received, queued and running plus output bytes "
                             "waiting to be sent, over all calls (the memory budget in use).")
                         .Register(*registry_)
                         .Add({});
  inflight_bytes_limit_ = &prometheus::BuildGauge()
                               .Name("anchorserve_inflight_bytes_limit")
                               .Help("The memory budget (--max_inflight_bytes, resolved).")
                               .Register(*registry_)
                               .Add({});
  auto& refusals = prometheus::BuildCounter()
                       .Name("anchorserve_refusals_total")
                       .Help("Calls refused or stopped for lack of room, by reason.")
                       .Register(*registry_);
  for (int r = 0; r < kNumRefusals; ++r) {
    refusals_[r] = &refusals.Add({{"reason", std::string(RefusalName(static_cast<Refusal>(r)))}});
  }
}

void MetricsRegistry::CountRequest(Rpc rpc, grpc::StatusCode code, const std::string& caller) {
  int c = static_cast<int>(code);
  if (c < 0 || c >= kNumGrpcCodes) c = static_cast<int>(grpc::StatusCode::UNKNOWN);
  requests_[static_cast<int>(rpc)][c]->Increment();
  if (!caller.empty()) CountCallerRequest(caller, rpc, code);
}

void MetricsRegistry::CountCallerRequest(const std::string& caller, Rpc rpc,
                                         grpc::StatusCode code) {
  int c = static_cast<int>(code);
  if (c < 0 || c >= kNumGrpcCodes) c = static_cast<int>(grpc::StatusCode::UNKNOWN);
  // Children appear as callers do (the family locks); the names are the token file's, so the
  // label set stays as small as that file.
  caller_requests_
      ->Add({{"caller", caller},
             {"rpc", std::string(RpcName(rpc))},
             {"code", std::string(GrpcCodeName(static_cast<grpc::StatusCode>(c)))}})
      .Increment();
}

void MetricsRegistry::CountUnauthenticated() { unauthenticated_->Increment(); }

void MetricsRegistry::ObserveRequestDuration(Rpc rpc, double seconds) {
  request_duration_[static_cast<int>(rpc)]->Observe(seconds);
}

void MetricsRegistry::ObserveQueueDuration(double seconds) { queue_duration_->Observe(seconds); }

void MetricsRegistry::ObserveComputeDuration(double seconds) {
  compute_duration_->Observe(seconds);
}

void MetricsRegistry::ObserveBatchSize(int requests) { batch_size_->Observe(requests); }

void MetricsRegistry::AddTokens(int64_t tokens) { tokens_->Increment(static_cast<double>(tokens)); }

void MetricsRegistry::ObserveDensity(double density) { density_->Observe(density); }

void MetricsRegistry::CountModeRun(bool dense, bool chosen_by_auto) {
  mode_runs_[dense ? 1 : 0][chosen_by_auto ? 1 : 0]->Increment();
}

void MetricsRegistry::SetQueueDepth(Queue queue, int64_t depth) {
  queue_depth_[static_cast<int>(queue)]->Set(static_cast<double>(depth));
}

void MetricsRegistry::AddPrefillPendingKvBytes(int64_t delta) {
  prefill_pending_kv_bytes_->Increment(static_cast<double>(delta));
}

void MetricsRegistry::RequestStarted() { inflight_->Increment(); }

void MetricsRegistry::RequestDone() { inflight_->Decrement(); }

void MetricsRegistry::AddReceivedBytes(int64_t bytes) {
  received_bytes_->Increment(static_cast<double>(bytes));
}

void MetricsRegistry::AddSentBytes(int64_t bytes) {
  sent_bytes_->Increment(static_cast<double>(bytes));
}

void MetricsRegistry::AddInflightBytes(int64_t delta) {
  inflight_bytes_->Increment(static_cast<double>(delta));
}

void MetricsRegistry::AddPinnedHostBytes(int64_t delta) {
  pinned_host_bytes_->Increment(static_cast<double>(delta));
}

void MetricsRegistry::SetInflightBytesLimit(int64_t bytes) {
  inflight_bytes_limit_->Set(static_cast<double>(bytes));
}

void MetricsRegistry::CountRefusal(Refusal reason) {
  refusals_[static_cast<int>(reason)]->Increment();
}

}  // namespace anchorserve
