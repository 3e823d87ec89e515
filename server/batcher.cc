#include "server/batcher.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"

namespace anchorserve {

BatchDecision DecideBatch(absl::Span<const std::shared_ptr<BatchJob>> queue, absl::Time now,
                          const BatchLimits& limits, bool flush) {
  BatchDecision decision;
  if (queue.empty()) return decision;
  const BatchJob& head = *queue.front();
  std::vector<size_t> members = {0};
  int64_t tokens = head.tokens();
  bool full =
      members.size() >= static_cast<size_t>(limits.max_requests) || tokens >= limits.max_tokens;
  for (size_t i = 1; i < queue.size() && !full; ++i) {
    const BatchJob& job = *queue[i];
    if (job.batch_key() != head.batch_key()) continue;
    if (tokens + job.tokens() > limits.max_tokens) {
      // FIFO among compatible requests: a later, smaller one does not overtake this one.
      full = true;
      break;
    }
    members.push_back(i);
    tokens += job.tokens();
    full =
        members.size() >= static_cast<size_t>(limits.max_requests) || tokens >= limits.max_tokens;
  }
  const absl::Time due = head.enqueue_time + limits.max_delay;
  if (full || flush || now >= due) {
    decision.members = std::move(members);
    decision.wait = absl::ZeroDuration();
  } else {
    decision.wait = due - now;
  }
  return decision;
}

absl::Status DropReason(const BatchJob& job, absl::Time now, absl::Duration max_queue_time) {
  if (job.deadline <= now) {
    return absl::DeadlineExceededError("deadline passed while the request was queued");
  }
  if (job.Cancelled()) {
    return absl::CancelledError("request cancelled before compute");
  }
  if (max_queue_time > absl::ZeroDuration() && now - job.enqueue_time >= max_queue_time) {
    return absl::ResourceExhaustedError(
        absl::StrCat("request waited ", absl::FormatDuration(now - job.enqueue_time),
                     " in the queue without starting (--max_queue_time_ms=",
                     absl::ToDoubleMilliseconds(max_queue_time), "); retry later"));
  }
  return absl::OkStatus();
}

namespace {

// Weight of the newest batch in the moving average of seconds per token.
constexpr double kThroughputSmoothing = 0.2;

}  // namespace

DynamicBatcher::DynamicBatcher(BatchLimits limits, int max_queue_size, BatchRunner* runner,
                               Clock* clock, MetricsRegistry* metrics, Queue queue,
                               absl::AnyInvocable<void(const absl::Status&)> on_device_unusable)
    : limits_(limits),
      max_queue_size_(max_queue_size),
      runner_(runner),
      clock_(clock),
      metrics_(metrics),
      queue_name_(queue),
      on_device_unusable_(std::move(on_device_unusable)) {
  worker_ = std::thread([this] { WorkerLoop(); });
}

DynamicBatcher::~DynamicBatcher() { Stop(); }

absl::Status DynamicBatcher::Enqueue(std::shared_ptr<BatchJob> job) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("server is draining");
  if (queue_.size() >= static_cast<size_t>(max_queue_size_)) {
    metrics_->CountRefusal(Refusal::kQueueFull);
    return absl::ResourceExhaustedError(
        absl::StrCat("queue is full: ", queue_.size(),
                     " requests waiting (--max_queue_size=", max_queue_size_, ")"));
  }
  const absl::Time now = clock_->Now();
  // Only the queued work counts (not the running batch's rest, nor the job itself): a refusal
  // means the deadline is out of reach even on that optimistic estimate.
  const absl::Duration queued_work =
      absl::Seconds(seconds_per_token_ * static_cast<double>(queued_tokens_));
  if (queued_work > absl::ZeroDuration() && job->deadline != absl::InfiniteFuture() &&
      now + queued_work > job->deadline) {
    metrics_->CountRefusal(Refusal::kDeadline);
    return absl::ResourceExhaustedError(absl::StrCat(
        "the deadline (in ", absl::FormatDuration(job->deadline - now), ") cannot be met: about ",
        absl::FormatDuration(queued_work), " of work is queued ahead (", queue_.size(),
        " requests); retry later or elsewhere"));
  }
  job->enqueue_time = now;
  queued_tokens_ += job->tokens();
  queue_.push_back(std::move(job));
  metrics_->SetQueueDepth(queue_name_, static_cast<int64_t>(queue_.size()));
  wake_.Signal();
  return absl::OkStatus();
}

void DynamicBatcher::Wake() {
  absl::MutexLock lock(&mu_);
  wake_.Signal();
}

void DynamicBatcher::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    wake_.Signal();
  }
  if (worker_.joinable()) worker_.join();
}

void DynamicBatcher::CancelAll() {
  absl::MutexLock lock(&mu_);
  for (const auto& job : queue_) job->cancelled.store(true, std::memory_order_relaxed);
  for (const auto& job : running_) job->cancelled.store(true, std::memory_order_relaxed);
  wake_.Signal();
}

int64_t DynamicBatcher::QueueDepth() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(queue_.size());
}

double DynamicBatcher::SecondsPerToken() const {
  absl::MutexLock lock(&mu_);
  return seconds_per_token_;
}

void DynamicBatcher::TakeDeadJobs(absl::Time now, std::vector<std::shared_ptr<BatchJob>>* dropped) {
  size_t kept = 0;
  for (size_t i = 0; i < queue_.size(); ++i) {
    absl::Status reason = DropReason(*queue_[i], now, limits_.max_queue_time);
    if (reason.ok()) {
      queue_[kept++] = std::move(queue_[i]);
    } else {
      if (absl::IsResourceExhausted(reason)) metrics_->CountRefusal(Refusal::kQueueTime);
      queued_tokens_ -= queue_[i]->tokens();
      queue_[i]->status = std::move(reason);
      dropped->push_back(std::move(queue_[i]));
    }
  }
  queue_.resize(kept);
}

void DynamicBatcher::WorkerLoop() {
  bool exit = false;
  while (!exit) {
    std::vector<std::shared_ptr<BatchJob>> dropped;
    std::vector<std::shared_ptr<BatchJob>> batch;
    {
      // Held only to move jobs in and out of the queue.
      absl::MutexLock lock(&mu_);
      while (true) {
        const absl::Time now = clock_->Now();
        TakeDeadJobs(now, &dropped);
        if (queue_.empty()) {
          if (stopping_) exit = true;
          if (stopping_ || !dropped.empty()) break;
          wake_.Wait(&mu_);
          continue;
        }
        BatchDecision decision = DecideBatch(queue_, now, limits_, stopping_);
        if (!decision.members.empty()) {
          for (size_t index : decision.members) {
            queue_[index]->queue_seconds = absl::ToDoubleSeconds(now - queue_[index]->enqueue_time);
            queued_tokens_ -= queue_[index]->tokens();
            batch.push_back(std::move(queue_[index]));
          }
          std::erase(queue_, nullptr);
          running_ = batch;
          break;
        }
        if (!dropped.empty()) break;  // finish those first, then decide again
        // Also wake for the earliest deadline, so an expired job leaves the queue promptly.
        absl::Duration wait = decision.wait;
        for (const auto& job : queue_) {
          wait = std::min(wait, job->deadline - now);
          if (limits_.max_queue_time > absl::ZeroDuration()) {
            wait = std::min(wait, job->enqueue_time + limits_.max_queue_time - now);
          }
        }
        wake_.WaitWithTimeout(&mu_, std::max(wait, absl::ZeroDuration()));
      }
      metrics_->SetQueueDepth(queue_name_, static_cast<int64_t>(queue_.size()));
    }
    for (const auto& job : dropped) job->on_done();
    dropped.clear();
    if (!batch.empty()) RunBatch(std::move(batch));
  }
}

void DynamicBatcher::RunBatch(std::vector<std::shared_ptr<BatchJob>> batch) {
  // Last look before compute: a job may have been cancelled or expired since the decision.
  const absl::Time now = clock_->Now();
  std::vector<std::shared_ptr<BatchJob>> live;
  live.reserve(batch.size());
  for (auto& job : batch) {
    absl::Status reason = DropReason(*job, now);
    if (reason.ok()) {
      live.push_back(std::move(job));
    } else {
      job->status = std::move(reason);
      job->on_done();
    }
  }
  batch = std::move(live);
  if (batch.empty()) {
    absl::MutexLock lock(&mu_);
    running_.clear();
    return;
  }
  std::vector<BatchJob*> jobs;
  jobs.reserve(batch.size());
  for (const auto& job : batch) {
    job->batch_size = static_cast<int>(batch.size());
    job->status = absl::OkStatus();
    jobs.push_back(job.get());
  }
  const double compute_seconds = runner_->Run(jobs);
  int64_t batch_tokens = 0;
  for (const BatchJob* job : jobs) batch_tokens += job->tokens();
  {
    absl::MutexLock lock(&mu_);
    running_.clear();
    if (batch_tokens > 0 && compute_seconds > 0) {
      const double measured = compute_seconds / static_cast<double>(batch_tokens);
      seconds_per_token_ =
          seconds_per_token_ == 0
              ? measured
              : (1 - kThroughputSmoothing) * seconds_per_token_ + kThroughputSmoothing * measured;
    }
  }
  metrics_->ObserveBatchSize(static_cast<int>(batch.size()));
  metrics_->ObserveComputeDuration(compute_seconds);
  for (const auto& job : batch) {
    metrics_->ObserveQueueDuration(job->queue_seconds);
    if (job->status.ok()) metrics_->AddTokens(job->tokens());
    if (on_device_unusable_ != nullptr && IsDeviceUnusable(job->status)) {
      on_device_unusable_(job->status);
      on_device_unusable_ = nullptr;  // once
    }
    job->on_done();
  }
}

}  // namespace anchorserve
