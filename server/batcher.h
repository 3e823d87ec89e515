// Dynamic batching: a bounded queue in front of one worker thread that runs batches of
// compatible requests on the executor.
//
// A batch starts from the oldest queued request and takes, in queue order, the later requests
// compatible with it (same dtype, layout, head counts, head_dim and effective config) while it has
// fewer than max_requests and their seq_len sum stays within max_tokens (the first request always
// fits, so an oversized one runs alone). It is dispatched as soon as it is full (by count or by
// tokens), when the oldest request has waited max_delay, or at once while stopping. Requests whose
// deadline has passed or that were cancelled are dropped before compute.
#pragma once

#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "server/attention_job.h"
#include "server/clock.h"
#include "server/executor.h"
#include "server/metrics.h"

namespace anchorserve {

struct BatchLimits {
  int max_requests = 8;
  int64_t max_tokens = 262144;
  absl::Duration max_delay = absl::Milliseconds(2);
};

struct BatchDecision {
  // Queue indices (ascending) of the batch to run now; empty = wait.
  std::vector<size_t> members;
  // When waiting: how long until the oldest request reaches max_delay (infinite on an empty
  // queue). A new arrival may change the decision sooner.
  absl::Duration wait = absl::InfiniteDuration();
};

// Requests that may share one backend run.
bool Compatible(const AttentionTask& a, const AttentionTask& b);

// The pure batching decision: `queue` in arrival order (enqueue_time set), no dead jobs in it.
// `flush`: dispatch whatever can be formed without waiting (the batcher is stopping).
BatchDecision DecideBatch(absl::Span<const std::shared_ptr<AttentionJob>> queue, absl::Time now,
                          const BatchLimits& limits, bool flush);

// DEADLINE_EXCEEDED when the job's deadline is at or before `now`, CANCELLED when it was
// cancelled, OK when it should still run.
absl::Status DropReason(const AttentionJob& job, absl::Time now);

class DynamicBatcher {
 public:
  // Starts the worker thread. `executor`, `clock` and `metrics` must outlive the batcher.
  DynamicBatcher(BatchLimits limits, int max_queue_size, BatchExecutor* executor, Clock* clock,
                 MetricsRegistry* metrics);
  ~DynamicBatcher();  // Stop()
  DynamicBatcher(const DynamicBatcher&) = delete;
  DynamicBatcher& operator=(const DynamicBatcher&) = delete;

  // Queues `job`; its on_done runs later on the worker thread. Refused at once (on_done never
  // runs) with RESOURCE_EXHAUSTED when max_queue_size requests wait, UNAVAILABLE after Stop().
  absl::Status Enqueue(std::shared_ptr<AttentionJob> job);

  // A queued job was cancelled: let the worker drop it now rather than at its next decision.
  void Wake();

  // Refuses new jobs, runs every queued one (without waiting for batches to fill), joins the
  // worker. Idempotent.
  void Stop();

  // Marks every queued and running job cancelled (the drain timed out): queued ones finish with
  // CANCELLED before compute, running ones as soon as the backend notices.
  void CancelAll();

  int64_t QueueDepth() const;

 private:
  void WorkerLoop();
  // Moves dead jobs of the queue into `dropped` with their status set.
  void TakeDeadJobs(absl::Time now, std::vector<std::shared_ptr<AttentionJob>>* dropped)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunBatch(std::vector<std::shared_ptr<AttentionJob>> batch);

  const BatchLimits limits_;
  const int max_queue_size_;
  BatchExecutor* const executor_;
  Clock* const clock_;
  MetricsRegistry* const metrics_;

  mutable absl::Mutex mu_;
  absl::CondVar wake_;
  std::vector<std::shared_ptr<AttentionJob>> queue_ ABSL_GUARDED_BY(mu_);  // arrival order
  std::vector<std::shared_ptr<AttentionJob>> running_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread worker_;
};

}  // namespace anchorserve
