// What the dynamic batcher needs of a job, whatever it computes (one attention, one prefill).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace anchorserve {

// Shared by the RPC that made it and by the batcher while it is queued or running. Jobs whose
// batch_key() is equal may run in one batch (the key encodes the job kind, so a runner only
// ever sees its own kind).
class BatchJob {
 public:
  BatchJob() = default;
  virtual ~BatchJob() = default;
  BatchJob(const BatchJob&) = delete;
  BatchJob& operator=(const BatchJob&) = delete;

  virtual const std::string& batch_key() const = 0;
  // What the batch's token budget counts.
  virtual int64_t tokens() const = 0;

  bool Cancelled() const { return cancelled.load(std::memory_order_relaxed); }

  // Set when the RPC is cancelled (or the server gives up draining): the job is dropped before
  // compute, and the runner abandons it mid-way.
  std::atomic<bool> cancelled{false};
  // Not computed when this has passed by the time its batch starts.
  absl::Time deadline = absl::InfiniteFuture();

  // Called exactly once on the batcher's worker thread with the final `status`, unless Enqueue()
  // refused the job (then never). Must not block.
  absl::AnyInvocable<void()> on_done;

  // Filled by the batcher and the runner before `on_done`.
  absl::Time enqueue_time;
  double queue_seconds = 0;  // enqueue to batch start
  int batch_size = 0;        // jobs in the batch it ran in
  absl::Status status;
};

// Runs one batch of jobs that share a batch key; sets each job's status. Returns the wall
// seconds of the compute (0 when nothing ran).
class BatchRunner {
 public:
  virtual ~BatchRunner() = default;
  virtual double Run(absl::Span<BatchJob* const> batch) = 0;
};

}  // namespace anchorserve
