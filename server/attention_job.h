// One attention request on its way through the batcher and the executor.
#pragma once

#include <atomic>
#include <optional>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "kernels/attention_types.h"
#include "kernels/metrics.h"

namespace anchorserve {

// Shared by the RPC that made it and by the batcher while it is queued or running. The RPC owns
// the tensor buffers the task points at and keeps them alive until `on_done` has run.
struct AttentionJob {
  AttentionJob() { task.maybe_cancelled = &cancelled; }
  AttentionJob(const AttentionJob&) = delete;
  AttentionJob& operator=(const AttentionJob&) = delete;

  // Inputs: shape, dtype, layout, config, buffers. The backend writes out, head_stats, times.
  AttentionTask task;
  // Set when the RPC is cancelled (or the server gives up draining): the job is dropped before
  // compute, and the backend abandons it mid-way.
  std::atomic<bool> cancelled{false};
  // Not computed when this has passed by the time its batch starts.
  absl::Time deadline = absl::InfiniteFuture();
  // Also run dense attention and fill `recall`.
  bool compute_recall = false;

  // Called exactly once on the batcher's worker thread with the final `status`, unless Enqueue()
  // refused the job (then never). Must not block.
  absl::AnyInvocable<void(AttentionJob&)> on_done;

  // Filled by the batcher and the executor before `on_done`.
  absl::Time enqueue_time;
  double queue_seconds = 0;           // enqueue to batch start
  int batch_size = 0;                 // requests in the batch it ran in
  RequestSummary summary;             // density and stripe statistics, when status is OK
  std::optional<RecallStats> recall;  // when compute_recall and status is OK
  absl::Status status;

  int64_t tokens() const { return task.shape.seq_len; }
};

}  // namespace anchorserve
