// Dynamic batching: a bounded queue in front of one worker thread that runs batches of
// compatible jobs on a BatchRunner. Generic over the job kind (batch_job.h).
//
// A batch starts from the oldest queued job and takes, in queue order, the later jobs with the
// same batch key while it has fewer than max_requests and their token sum stays within
// max_tokens (the first job always fits, so an oversized one runs alone). It is dispatched as soon
// as it is full (by count or by tokens), when the oldest request has waited max_delay, or at once
// while stopping. Requests whose deadline has passed or that were cancelled are dropped before
// compute.
#pragma once

#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "server/batch_job.h"
#include "server/clock.h"
#include "server/metrics.h"

namespace anchorserve {

// The server's come from ServerConfig (--max_batch_requests, --max_batch_tokens,
// --max_queue_delay_ms); no defaults here.
struct BatchLimits {
  int max_requests;
  int64_t max_tokens;
  absl::Duration max_delay;
  // Longest a job may wait in the queue (--max_queue_time_ms); zero = no bound.
  absl::Duration max_queue_time = absl::ZeroDuration();
};

struct BatchDecision {
  // Queue indices (ascending) of the batch to run now; empty = wait.
  std::vector<size_t> members;
  // When waiting: how long until the oldest request reaches max_delay (infinite on an empty
  // queue). A new arrival may change the decision sooner.
  absl::Duration wait = absl::InfiniteDuration();
};

// The pure batching decision: `queue` in arrival order (enqueue_time set), no dead jobs in it.
// `flush`: dispatch whatever can be formed without waiting (the batcher is stopping).
BatchDecision DecideBatch(absl::Span<const std::shared_ptr<BatchJob>> queue, absl::Time now,
                          const BatchLimits& limits, bool flush);

// DEADLINE_EXCEEDED when the job's deadline is at or before `now`, CANCELLED when it was
// cancelled, RESOURCE_EXHAUSTED when it has waited `max_queue_time` (when non-zero), OK when it
// should still run.
absl::Status DropReason(const BatchJob& job, absl::Time now,
                        absl::Duration max_queue_time = absl::ZeroDuration());

class DynamicBatcher {
 public:
  // Starts the worker thread. `runner`, `clock` and `metrics` must outlive the batcher.
  // `on_device_unusable` (optional) is called on the worker thread with the first job status that
  // IsDeviceUnusable (kernels/backend.h) reports, once.
  DynamicBatcher(BatchLimits limits, int max_queue_size, BatchRunner* runner, Clock* clock,
                 MetricsRegistry* metrics, Queue queue = Queue::kAttention,
                 absl::AnyInvocable<void(const absl::Status&)> on_device_unusable = nullptr);
  ~DynamicBatcher();  // Stop()
  DynamicBatcher(const DynamicBatcher&) = delete;
  DynamicBatcher& operator=(const DynamicBatcher&) = delete;

  // Queues `job`; its on_done runs later on the worker thread. Refused at once (on_done never
  // runs) with RESOURCE_EXHAUSTED when max_queue_size requests wait or when the work queued
  // ahead would, at the throughput measured so far, outlast the job's deadline; UNAVAILABLE
  // after Stop().
  absl::Status Enqueue(std::shared_ptr<BatchJob> job);

  // A queued job was cancelled: let the worker drop it now rather than at its next decision.
  void Wake();

  // Refuses new jobs, runs every queued one (without waiting for batches to fill), joins the
  // worker. Idempotent.
  void Stop();

  // Marks every queued and running job cancelled (the drain timed out): queued ones finish with
  // CANCELLED before compute, running ones as soon as the backend notices.
  void CancelAll();

  int64_t QueueDepth() const;
  // Measured compute seconds per token (moving average over batches); 0 before the first batch.
  double SecondsPerToken() const;

 private:
  void WorkerLoop();
  // Moves dead jobs of the queue into `dropped` with their status set.
  void TakeDeadJobs(absl::Time now, std::vector<std::shared_ptr<BatchJob>>* dropped)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunBatch(std::vector<std::shared_ptr<BatchJob>> batch);

  const BatchLimits limits_;
  const int max_queue_size_;
  BatchRunner* const runner_;
  Clock* const clock_;
  MetricsRegistry* const metrics_;
  const Queue queue_name_;
  absl::AnyInvocable<void(const absl::Status&)> on_device_unusable_;  // worker thread only

  mutable absl::Mutex mu_;
  absl::CondVar wake_;
  std::vector<std::shared_ptr<BatchJob>> queue_ ABSL_GUARDED_BY(mu_);  // arrival order
  std::vector<std::shared_ptr<BatchJob>> running_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int64_t queued_tokens_ ABSL_GUARDED_BY(mu_) = 0;  // over queue_
  double seconds_per_token_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread worker_;
};

}  // namespace anchorserve
