// One Prefill request on its way through the prefill batcher and the engine.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/prefill_engine.h"
#include "server/batch_job.h"
#include "server/metrics.h"

namespace anchorserve {

// The RPC that made it owns the sink and keeps it alive until `on_done` has run.
class PrefillJob final : public BatchJob {
 public:
  explicit PrefillJob(std::vector<int32_t> token_ids) : token_ids_(std::move(token_ids)) {
    task.token_ids = token_ids_;
    task.maybe_cancelled = &cancelled;
  }

  // One key: prefills run one at a time (the prefill batcher takes one job per batch).
  const std::string& batch_key() const override {
    static const std::string* const key = new std::string("prefill");
    return *key;
  }
  int64_t tokens() const override { return static_cast<int64_t>(token_ids_.size()); }

  PrefillTask task;  // token_ids points into this job
  KvSink* sink = nullptr;

  // Filled by the runner when status is OK.
  PrefillResult result;

 private:
  const std::vector<int32_t> token_ids_;  // [N]
};

// The BatchRunner of prefill jobs: each job's whole forward pass on the engine, its KV going to
// the job's sink while later layers compute.
// After each job it brings anchorserve_pinned_host_bytes up to date with the page-locked memory
// the engine keeps (`metrics` may be null).
class PrefillRunner final : public BatchRunner {
 public:
  PrefillRunner(PrefillEngine* engine, MetricsRegistry* metrics)
      : engine_(engine), metrics_(metrics) {}
  double Run(absl::Span<BatchJob* const> batch) override;

 private:
  void ReportKeptPinnedBytes();

  PrefillEngine* const engine_;
  MetricsRegistry* const metrics_;
  int64_t reported_pinned_bytes_ = 0;  // the engine's share of the gauge
};

}  // namespace anchorserve
