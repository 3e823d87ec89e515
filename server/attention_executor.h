// The BatchRunner of attention jobs: the sparse (or dense) pass on the backend, then for jobs
// that asked for recall a dense pass with LSE on the same backend, then the per-request
// summaries and their density metric.
#pragma once

#include <memory>
#include <vector>

#include "absl/types/span.h"
#include "kernels/backend.h"
#include "server/attention_job.h"
#include "server/batch_job.h"
#include "server/metrics.h"

namespace anchorserve {

class AttentionExecutor final : public BatchRunner {
 public:
  // Both must outlive the executor.
  AttentionExecutor(AttentionBackend* backend, MetricsRegistry* metrics)
      : backend_(backend), metrics_(metrics) {}

  // Fills status, summary and recall of every job; `batch` holds AttentionJobs of one batch key.
  // Returns the wall seconds of the main backend run (0 when nothing ran).
  double Run(absl::Span<BatchJob* const> batch) override;

 private:
  // Dense attention with LSE of the jobs that asked for recall and succeeded.
  // Their tasks still point maybe_lse at the sparse pass's LSE.
  void RunRecall(absl::Span<AttentionJob* const> jobs);

  AttentionBackend* const backend_;
  MetricsRegistry* const metrics_;
};

}  // namespace anchorserve
