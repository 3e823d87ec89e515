// One attention request on its way through the batcher and the attention executor.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "kernels/attention_types.h"
#include "kernels/sparsity_stats.h"
#include "server/batch_job.h"

namespace anchorserve {

// The RPC that made it owns the tensor buffers the task points at and keeps them alive until
// `on_done` has run.
class AttentionJob final : public BatchJob {
 public:
  AttentionJob() { task.maybe_cancelled = &cancelled; }

  // Recomputes the batch key from `task`; call after the task's problem is set.
  void UpdateBatchKey() { key_ = AttentionBatchKey(ProblemOf(task)); }
  const std::string& batch_key() const override { return key_; }
  int64_t tokens() const override { return task.shape.seq_len; }

  // Inputs: shape, dtype, layout, config, buffers. The backend writes out, head_stats, times.
  AttentionTask task;
  // Also run dense attention and fill `recall`.
  bool compute_recall = false;
  std::string mode_choice;  // RequestSpec::mode_choice, for the metrics

  // Filled by the executor before `on_done`.
  RequestSummary summary;             // density and stripe statistics, when status is OK
  std::optional<RecallStats> recall;  // when compute_recall and status is OK

 private:
  std::string key_;
};

}  // namespace anchorserve
