// Runs one batch of jobs on the backend: the sparse (or dense) pass, then for jobs that asked for
// recall a dense pass with LSE on the same backend, then the per-request summaries.
#pragma once

#include <memory>
#include <vector>

#include "absl/types/span.h"
#include "kernels/backend.h"
#include "server/attention_job.h"

namespace anchorserve {

class BatchExecutor {
 public:
  explicit BatchExecutor(AttentionBackend* backend) : backend_(backend) {}

  // Fills status, summary and recall of every job; `batch` shares dtype, layout, heads, head_dim
  // and config. Returns the wall seconds of the main backend run (0 when nothing ran).
  double Run(absl::Span<const std::shared_ptr<AttentionJob>> batch);

 private:
  // Dense attention with LSE of the jobs that asked for recall and succeeded.
  // Their tasks still point maybe_lse at the sparse pass's LSE.
  void RunRecall(absl::Span<AttentionJob* const> jobs);

  AttentionBackend* backend_;
};

}  // namespace anchorserve
