#include "server/batcher.h"

#include <limits>
#include <memory>
#include <vector>

#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/attention_executor.h"
#include "server/clock.h"
#include "server/metrics.h"
#include "tests/server/fake_backend.h"

namespace anchorserve {
namespace {

using fakes::FakeBackend;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// A job with its own small buffers: seq_len tokens, 2 query heads, 1 KV head, head_dim 4, bf16.
struct TestJob {
  explicit TestJob(int64_t seq_len, DType dtype = DType::kBf16) {
    job = std::make_shared<AttentionJob>();
    AttentionTask& task = job->task;
    task.shape = {seq_len, 2, 1, 4};
    task.dtype = dtype;
    const size_t kv_bytes = static_cast<size_t>(seq_len) * 4 * ElementSize(dtype);
    q.assign(2 * kv_bytes, 1);
    k.assign(kv_bytes, 2);
    v.assign(kv_bytes, 3);
    out.assign(2 * kv_bytes, 0);
    task.q = q.data();
    task.k = k.data();
    task.v = v.data();
    task.out = out.data();
    job->UpdateBatchKey();
    job->on_done = [this]() {
      done_status = job->status;
      done_count++;
      finished.Notify();
    };
  }

  std::shared_ptr<AttentionJob> job;
  std::vector<uint8_t> q, k, v, out;
  absl::Status done_status = absl::UnknownError("on_done not called");
  int done_count = 0;
  absl::Notification finished;
};

std::vector<std::shared_ptr<BatchJob>> QueueOf(std::vector<TestJob*> jobs, absl::Time t0,
                                               absl::Duration spacing = absl::ZeroDuration()) {
  std::vector<std::shared_ptr<BatchJob>> queue;
  for (size_t i = 0; i < jobs.size(); ++i) {
    jobs[i]->job->UpdateBatchKey();
    jobs[i]->job->enqueue_time = t0 + spacing * static_cast<int64_t>(i);
    queue.push_back(jobs[i]->job);
  }
  return queue;
}

// --- The pure decision -----------------------------------------------------------------------

TEST(DecideBatchTest, EmptyQueueWaitsForever) {
  const BatchDecision decision =
      DecideBatch({}, absl::Now(), BatchLimits{8, 1000, absl::Milliseconds(2)}, false);
  EXPECT_THAT(decision.members, IsEmpty());
  EXPECT_EQ(decision.wait, absl::InfiniteDuration());
}

TEST(DecideBatchTest, DispatchesWhenTheOldestReachesMaxDelay) {
  FakeClock clock;
  const absl::Time t0 = clock.Now();
  TestJob a(16), b(16);
  const auto queue = QueueOf({&a, &b}, t0, absl::Milliseconds(1));
  const BatchLimits limits{8, 1000, absl::Milliseconds(2)};

  BatchDecision early = DecideBatch(queue, t0 + absl::Microseconds(500), limits, false);
  EXPECT_THAT(early.members, IsEmpty());
  EXPECT_EQ(early.wait, absl::Microseconds(1500));

  BatchDecision due = DecideBatch(queue, t0 + absl::Milliseconds(2), limits, false);
  EXPECT_THAT(due.members, ElementsAre(0, 1));
}

TEST(DecideBatchTest, DispatchesAtOnceWhenMaxRequestsQueued) {
  FakeClock clock;
  const absl::Time t0 = clock.Now();
  TestJob a(16), b(16), c(16), d(16);
  const BatchLimits limits{3, 1000, absl::Hours(1)};

  EXPECT_THAT(DecideBatch(QueueOf({&a, &b}, t0), t0, limits, false).members, IsEmpty());
  EXPECT_THAT(DecideBatch(QueueOf({&a, &b, &c, &d}, t0), t0, limits, false).members,
              ElementsAre(0, 1, 2));
}

TEST(DecideBatchTest, DispatchesAtOnceWhenMaxTokensReached) {
  FakeClock clock;
  const absl::Time t0 = clock.Now();
  TestJob a(100), b(100), c(100);
  const BatchLimits limits{8, 250, absl::Hours(1)};
  // a + b = 200 and c does not fit: full.
  EXPECT_THAT(DecideBatch(QueueOf({&a, &b, &c}, t0), t0, limits, false).members, ElementsAre(0, 1));
  // Exactly max_tokens is full too.
  const BatchLimits exact{8, 200, absl::Hours(1)};
  EXPECT_THAT(DecideBatch(QueueOf({&a, &b}, t0), t0, exact, false).members, ElementsAre(0, 1));
  // Under both limits: wait.
  EXPECT_THAT(DecideBatch(QueueOf({&a, &b}, t0), t0, limits, false).members, IsEmpty());
}

TEST(DecideBatchTest, OversizedRequestRunsAlone) {
  FakeClock clock;
  const absl::Time t0 = clock.Now();
  TestJob big(1000), small(10);
  EXPECT_THAT(
      DecideBatch(QueueOf({&big, &small}, t0), t0, BatchLimits{8, 500, absl::Hours(1)}, false)
          .members,
      ElementsAre(0));
}

TEST(DecideBatchTest, LaterSmallerRequestDoesNotOvertake) {
  FakeClock clock;
  const absl::Time t0 = clock.Now();
  TestJob a(100), b(300), c(50);
  EXPECT_THAT(DecideBatch(QueueOf({&a, &b, &c}, t0), t0, BatchLimits{8, 350, absl::Hours(1)}, false)
                  .members,
              ElementsAre(0));
}

TEST(DecideBatchTest, IncompatibleRequestsAreNotMixed) {
  FakeClock clock;
  const absl::Time t0 = clock.Now();
  TestJob a(16), other_dtype(16, DType::kFp16), c(16), other_theta(16), other_heads(16),
      other_layout(16), e(16);
  other_theta.job->task.config.theta = 3.0f;
  other_heads.job->task.shape.num_q_heads = 4;
  other_layout.job->task.layout = Layout::kHeadMajor;
  const auto queue =
      QueueOf({&a, &other_dtype, &c, &other_theta, &other_heads, &other_layout, &e}, t0);
  const BatchDecision decision =
      DecideBatch(queue, t0 + absl::Seconds(1), BatchLimits{8, 1000, absl::Milliseconds(2)}, false);
  EXPECT_THAT(decision.members, ElementsAre(0, 2, 6));

  // With the head gone, the fp16 request leads its own batch.
  const auto rest = QueueOf({&other_dtype, &other_theta}, t0);
  EXPECT_THAT(
      DecideBatch(rest, t0 + absl::Seconds(1), BatchLimits{8, 1000, absl::Milliseconds(2)}, false)
          .members,
      ElementsAre(0));
}

TEST(DecideBatchTest, MassTargetSettingsAreNotMixed) {
  FakeClock clock;
  const absl::Time t0 = clock.Now();
  TestJob a(16), target(16), other_target(16), cap(16), min_theta(16), same_as_target(16), e(16);
  target.job->task.config.mass_target = 0.95f;
  other_target.job->task.config.mass_target = 0.9f;
  cap.job->task.config.mass_target = 0.95f;
  cap.job->task.config.mass_density_cap = 0.5f;
  min_theta.job->task.config.mass_target = 0.95f;
  min_theta.job->task.config.mass_min_theta = 2.0f;
  same_as_target.job->task.config.mass_target = 0.95f;
  const BatchLimits limits{8, 1000, absl::Milliseconds(2)};
  // Fixed theta leads: none of the mass-target requests join it.
  EXPECT_THAT(DecideBatch(QueueOf({&a, &target, &other_target, &cap, &min_theta, &e}, t0),
                          t0 + absl::Seconds(1), limits, false)
                  .members,
              ElementsAre(0, 5));
  // A mass target leads: only the request with the same target, cap and min_theta joins.
  EXPECT_THAT(
      DecideBatch(QueueOf({&target, &other_target, &cap, &min_theta, &a, &same_as_target}, t0),
                  t0 + absl::Seconds(1), limits, false)
          .members,
      ElementsAre(0, 5));
  // Differing from `target` only in the cap or in min_theta, each leads a batch of its own.
  EXPECT_THAT(
      DecideBatch(QueueOf({&cap, &min_theta, &target}, t0), t0 + absl::Seconds(1), limits, false)
          .members,
      ElementsAre(0));
  EXPECT_THAT(
      DecideBatch(QueueOf({&min_theta, &cap, &target}, t0), t0 + absl::Seconds(1), limits, false)
          .members,
      ElementsAre(0));
}

TEST(DecideBatchTest, NanThetaBatchesWithItself) {
  // The batcher and the backends share AttentionBatchKey, so they agree on every config value.
  FakeClock clock;
  const absl::Time t0 = clock.Now();
  TestJob a(16), b(16);
  a.job->task.config.theta = std::numeric_limits<float>::quiet_NaN();
  b.job->task.config.theta = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THAT(
      DecideBatch(QueueOf({&a, &b}, t0), t0, BatchLimits{2, 1000, absl::Hours(1)}, false).members,
      ElementsAre(0, 1));
}

TEST(DecideBatchTest, FlushDispatchesWithoutWaiting) {
  FakeClock clock;
  const absl::Time t0 = clock.Now();
  TestJob a(16);
  EXPECT_THAT(
      DecideBatch(QueueOf({&a}, t0), t0, BatchLimits{8, 1000, absl::Hours(1)}, true).members,
      ElementsAre(0));
}

TEST(DropReasonTest, DeadlineThenCancellation) {
  FakeClock clock;
  TestJob job(16);
  EXPECT_TRUE(DropReason(*job.job, clock.Now()).ok());
  job.job->cancelled.store(true);
  EXPECT_EQ(DropReason(*job.job, clock.Now()).code(), absl::StatusCode::kCancelled);
  job.job->deadline = clock.Now();
  EXPECT_EQ(DropReason(*job.job, clock.Now()).code(), absl::StatusCode::kDeadlineExceeded);
}

// --- The worker, with a recording backend ---------------------------------------------------

class BatcherTest : public ::testing::Test {
 protected:
  void MakeBatcher(BatchLimits limits, int max_queue_size) {
    batcher_ =
        std::make_unique<DynamicBatcher>(limits, max_queue_size, &executor_, &clock_, &metrics_);
  }

  FakeClock clock_;
  FakeBackend backend_;
  MetricsRegistry metrics_;
  AttentionExecutor executor_{&backend_, &metrics_};
  std::unique_ptr<DynamicBatcher> batcher_;
};

TEST_F(BatcherTest, RunsAFullBatchTogether) {
  MakeBatcher({3, 1000, absl::Hours(1)}, 16);
  TestJob a(16), b(8), c(4);
  ASSERT_TRUE(batcher_->Enqueue(a.job).ok());
  ASSERT_TRUE(batcher_->Enqueue(b.job).ok());
  ASSERT_TRUE(batcher_->Enqueue(c.job).ok());
  for (TestJob* job : {&a, &b, &c}) {
    job->finished.WaitForNotification();
    EXPECT_TRUE(job->done_status.ok()) << job->done_status;
    EXPECT_EQ(job->job->batch_size, 3);
    EXPECT_EQ(job->done_count, 1);
  }
  ASSERT_EQ(backend_.runs().size(), 1u);
  EXPECT_THAT(backend_.runs()[0].seq_lens, ElementsAre(16, 8, 4));
  // The fake backend reports dense accounting.
  EXPECT_DOUBLE_EQ(a.job->summary.density, 1.0);
}

TEST_F(BatcherTest, DispatchesAfterMaxDelayOnTheInjectedClock) {
  MakeBatcher({8, 1000, absl::Milliseconds(10)}, 16);
  TestJob a(16);
  ASSERT_TRUE(batcher_->Enqueue(a.job).ok());
  clock_.Advance(absl::Milliseconds(10));
  batcher_->Wake();
  a.finished.WaitForNotification();
  EXPECT_TRUE(a.done_status.ok()) << a.done_status;
  EXPECT_EQ(a.job->batch_size, 1);
  EXPECT_DOUBLE_EQ(a.job->queue_seconds, 0.010);
}

TEST_F(BatcherTest, FullQueueRefusesAtOnceNamingTheFlag) {
  MakeBatcher({1, 1000, absl::ZeroDuration()}, 2);
  backend_.CloseGate();
  TestJob running(16), queued1(16), queued2(16), refused(16);
  ASSERT_TRUE(batcher_->Enqueue(running.job).ok());
  backend_.WaitForRuns(1);  // `running` left the queue
  ASSERT_TRUE(batcher_->Enqueue(queued1.job).ok());
  ASSERT_TRUE(batcher_->Enqueue(queued2.job).ok());
  EXPECT_EQ(batcher_->QueueDepth(), 2);
  const absl::Status status = batcher_->Enqueue(refused.job);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(status.message(), HasSubstr("--max_queue_size=2"));
  backend_.OpenGate();
  for (TestJob* job : {&running, &queued1, &queued2}) {
    job->finished.WaitForNotification();
    EXPECT_TRUE(job->done_status.ok()) << job->done_status;
  }
  batcher_->Stop();
  EXPECT_EQ(refused.done_count, 0);  // a refused job never gets on_done
  EXPECT_FALSE(backend_.Computed(refused.q.data()));
}

TEST_F(BatcherTest, ExpiredDeadlineIsDroppedWithoutCompute) {
  MakeBatcher({8, 1000, absl::ZeroDuration()}, 16);
  TestJob late(16);
  late.job->deadline = clock_.Now() - absl::Seconds(1);
  ASSERT_TRUE(batcher_->Enqueue(late.job).ok());
  late.finished.WaitForNotification();
  EXPECT_EQ(late.done_status.code(), absl::StatusCode::kDeadlineExceeded);
  batcher_->Stop();
  EXPECT_FALSE(backend_.Computed(late.q.data()));
  EXPECT_TRUE(backend_.runs().empty());
}

TEST_F(BatcherTest, DeadlinePassingWhileQueuedDropsTheJob) {
  MakeBatcher({1, 1000, absl::ZeroDuration()}, 16);
  backend_.CloseGate();
  TestJob busy(16), waiting(16);
  ASSERT_TRUE(batcher_->Enqueue(busy.job).ok());
  backend_.WaitForRuns(1);
  waiting.job->deadline = clock_.Now() + absl::Seconds(1);
  ASSERT_TRUE(batcher_->Enqueue(waiting.job).ok());
  clock_.Advance(absl::Seconds(2));
  backend_.OpenGate();
  busy.finished.WaitForNotification();
  waiting.finished.WaitForNotification();
  EXPECT_TRUE(busy.done_status.ok()) << busy.done_status;
  EXPECT_EQ(waiting.done_status.code(), absl::StatusCode::kDeadlineExceeded);
  batcher_->Stop();
  EXPECT_FALSE(backend_.Computed(waiting.q.data()));
}

TEST_F(BatcherTest, JobWaitingLongerThanMaxQueueTimeIsRefused) {
  MakeBatcher({1, 1000, absl::ZeroDuration(), absl::Milliseconds(500)}, 16);
  // Waited 499 ms behind a running batch: still runs.
  backend_.CloseGate();
  TestJob busy1(16), in_time(16);
  ASSERT_TRUE(batcher_->Enqueue(busy1.job).ok());
  backend_.WaitForRuns(1);
  ASSERT_TRUE(batcher_->Enqueue(in_time.job).ok());
  clock_.Advance(absl::Milliseconds(499));
  backend_.OpenGate();
  in_time.finished.WaitForNotification();
  EXPECT_TRUE(in_time.done_status.ok()) << in_time.done_status;

  // Waited 500 ms: refused without compute.
  backend_.CloseGate();
  TestJob busy2(16), too_late(16);
  ASSERT_TRUE(batcher_->Enqueue(busy2.job).ok());
  backend_.WaitForRuns(3);
  ASSERT_TRUE(batcher_->Enqueue(too_late.job).ok());
  clock_.Advance(absl::Milliseconds(500));
  backend_.OpenGate();
  too_late.finished.WaitForNotification();
  EXPECT_EQ(too_late.done_status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(too_late.done_status.message(), HasSubstr("--max_queue_time_ms=500"));
  batcher_->Stop();
  EXPECT_FALSE(backend_.Computed(too_late.q.data()));
}

TEST_F(BatcherTest, DeadlineThatTheQueuedWorkWouldOutlastIsRefusedAtAdmission) {
  MakeBatcher({1, 1000, absl::ZeroDuration()}, 16);
  // Nothing measured yet: no estimate, no refusal.
  TestJob first(16);
  first.job->deadline = clock_.Now() + absl::Nanoseconds(1);
  backend_.CloseGate();
  ASSERT_TRUE(batcher_->Enqueue(first.job).ok());
  backend_.WaitForRuns(1);
  absl::SleepFor(absl::Milliseconds(20));  // real compute time, measured by the executor
  backend_.OpenGate();
  first.finished.WaitForNotification();
  ASSERT_GT(batcher_->SecondsPerToken(), 0);

  backend_.CloseGate();
  TestJob busy(16), queued(16), hopeless(16), patient(16);
  ASSERT_TRUE(batcher_->Enqueue(busy.job).ok());
  backend_.WaitForRuns(2);
  ASSERT_TRUE(batcher_->Enqueue(queued.job).ok());
  hopeless.job->deadline = clock_.Now() + absl::Nanoseconds(1);
  const absl::Status refused = batcher_->Enqueue(hopeless.job);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.message(), HasSubstr("cannot be met"));
  patient.job->deadline = clock_.Now() + absl::Hours(1);
  EXPECT_TRUE(batcher_->Enqueue(patient.job).ok());
  backend_.OpenGate();
  for (TestJob* job : {&busy, &queued, &patient}) {
    job->finished.WaitForNotification();
    EXPECT_TRUE(job->done_status.ok()) << job->done_status;
  }
  batcher_->Stop();
  EXPECT_EQ(hopeless.done_count, 0);
}

TEST_F(BatcherTest, CancelledJobIsNotComputed) {
  MakeBatcher({1, 1000, absl::ZeroDuration()}, 16);
  backend_.CloseGate();
  TestJob busy(16), cancelled(16);
  ASSERT_TRUE(batcher_->Enqueue(busy.job).ok());
  backend_.WaitForRuns(1);
  ASSERT_TRUE(batcher_->Enqueue(cancelled.job).ok());
  cancelled.job->cancelled.store(true);
  batcher_->Wake();
  backend_.OpenGate();
  cancelled.finished.WaitForNotification();
  EXPECT_EQ(cancelled.done_status.code(), absl::StatusCode::kCancelled);
  batcher_->Stop();
  EXPECT_FALSE(backend_.Computed(cancelled.q.data()));
}

TEST_F(BatcherTest, CancellationDuringComputeComesBackCancelled) {
  MakeBatcher({1, 1000, absl::ZeroDuration()}, 16);
  backend_.CloseGate();
  TestJob job(16);
  ASSERT_TRUE(batcher_->Enqueue(job.job).ok());
  backend_.WaitForRuns(1);  // inside Run
  batcher_->CancelAll();
  backend_.OpenGate();
  job.finished.WaitForNotification();
  EXPECT_EQ(job.done_status.code(), absl::StatusCode::kCancelled);
}

TEST_F(BatcherTest, EnqueueAfterStopIsUnavailable) {
  MakeBatcher({8, 1000, absl::ZeroDuration()}, 16);
  batcher_->Stop();
  TestJob job(16);
  const absl::Status status = batcher_->Enqueue(job.job);
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(status.message(), HasSubstr("draining"));
  EXPECT_EQ(job.done_count, 0);
}

TEST_F(BatcherTest, StopRunsQueuedWorkWithoutWaitingForDelay) {
  MakeBatcher({8, 1000, absl::Hours(1)}, 16);
  TestJob a(16), b(16), c(8, DType::kFp16);
  ASSERT_TRUE(batcher_->Enqueue(a.job).ok());
  ASSERT_TRUE(batcher_->Enqueue(b.job).ok());
  ASSERT_TRUE(batcher_->Enqueue(c.job).ok());
  batcher_->Stop();  // returns after the queue drained
  for (TestJob* job : {&a, &b, &c}) {
    ASSERT_TRUE(job->finished.HasBeenNotified());
    EXPECT_TRUE(job->done_status.ok()) << job->done_status;
  }
  const auto runs = backend_.runs();
  ASSERT_EQ(runs.size(), 2u);  // bf16 pair, then the fp16 one
  EXPECT_THAT(runs[0].seq_lens, ElementsAre(16, 16));
  EXPECT_THAT(runs[1].seq_lens, ElementsAre(8));
}

TEST_F(BatcherTest, BackendFailureFailsEveryJobOfTheBatch) {
  MakeBatcher({2, 1000, absl::Hours(1)}, 16);
  backend_.SetRunStatus(absl::InternalError("device lost"));
  TestJob a(16), b(16);
  ASSERT_TRUE(batcher_->Enqueue(a.job).ok());
  ASSERT_TRUE(batcher_->Enqueue(b.job).ok());
  for (TestJob* job : {&a, &b}) {
    job->finished.WaitForNotification();
    EXPECT_EQ(job->done_status.code(), absl::StatusCode::kInternal);
    EXPECT_THAT(job->done_status.message(), HasSubstr("device lost"));
  }
}

TEST_F(BatcherTest, RecallRunsADensePassOnTheSameBackend) {
  MakeBatcher({8, 1000, absl::ZeroDuration()}, 16);
  TestJob job(16);
  job.job->compute_recall = true;
  ASSERT_TRUE(batcher_->Enqueue(job.job).ok());
  job.finished.WaitForNotification();
  ASSERT_TRUE(job.done_status.ok()) << job.done_status;
  const auto runs = backend_.runs();
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_EQ(runs[0].mode, AttentionMode::kAnchor);
  EXPECT_EQ(runs[1].mode, AttentionMode::kDense);
  ASSERT_TRUE(job.job->recall.has_value());
  // The fake computes the same output and LSE in both modes.
  EXPECT_DOUBLE_EQ(job.job->recall->output_recall_tau_0_01, 1.0);
  EXPECT_DOUBLE_EQ(job.job->recall->attention_mass_mean, 1.0);
  EXPECT_EQ(job.job->task.maybe_lse, nullptr);  // no pointer left into freed memory
}

// --- Any job kind -------------------------------------------------------------------------

class KeyedJob final : public BatchJob {
 public:
  KeyedJob(std::string key, int64_t tokens) : key_(std::move(key)), tokens_(tokens) {}
  const std::string& batch_key() const override { return key_; }
  int64_t tokens() const override { return tokens_; }

 private:
  std::string key_;
  int64_t tokens_;
};

class RecordingRunner final : public BatchRunner {
 public:
  double Run(absl::Span<BatchJob* const> batch) override {
    std::vector<std::string> keys;
    for (BatchJob* job : batch) keys.push_back(job->batch_key());
    absl::MutexLock lock(&mu_);
    batches_.push_back(std::move(keys));
    return 0;
  }
  std::vector<std::vector<std::string>> batches() const {
    absl::MutexLock lock(&mu_);
    return batches_;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<std::vector<std::string>> batches_ ABSL_GUARDED_BY(mu_);
};

TEST(GenericBatcherTest, BatchesAnyJobKindByKeyAndTokens) {
  FakeClock clock;
  MetricsRegistry metrics;
  RecordingRunner runner;
  std::vector<std::shared_ptr<KeyedJob>> jobs = {
      std::make_shared<KeyedJob>("x", 10), std::make_shared<KeyedJob>("y", 10),
      std::make_shared<KeyedJob>("x", 10), std::make_shared<KeyedJob>("x", 100)};
  absl::BlockingCounter done(static_cast<int>(jobs.size()));
  {
    DynamicBatcher batcher(BatchLimits{8, 50, absl::Hours(1)}, 16, &runner, &clock, &metrics);
    for (const auto& job : jobs) {
      job->on_done = [&done] { done.DecrementCount(); };
      ASSERT_TRUE(batcher.Enqueue(job).ok());
    }
    batcher.Stop();  // flushes without waiting for the delay
  }
  done.Wait();
  for (const auto& job : jobs) EXPECT_TRUE(job->status.ok()) << job->status;
  // "x" jobs batch together up to the token limit; "y" never joins them.
  EXPECT_THAT(runner.batches(),
              ElementsAre(ElementsAre("x", "x"), ElementsAre("y"), ElementsAre("x")));
}

class FailingRunner final : public BatchRunner {
 public:
  explicit FailingRunner(absl::Status status) : status_(std::move(status)) {}
  double Run(absl::Span<BatchJob* const> batch) override {
    for (BatchJob* job : batch) job->status = status_;
    return 0;
  }

 private:
  absl::Status status_;
};

TEST(GenericBatcherTest, ReportsAnUnusableDeviceOnce) {
  FakeClock clock;
  MetricsRegistry metrics;
  FailingRunner runner(DeviceUnusableError("illegal address"));
  std::vector<absl::Status> reported;
  auto a = std::make_shared<KeyedJob>("x", 1);
  auto b = std::make_shared<KeyedJob>("y", 1);
  {
    DynamicBatcher batcher(BatchLimits{1, 10, absl::ZeroDuration()}, 4, &runner, &clock, &metrics,
                           Queue::kAttention,
                           [&reported](const absl::Status& status) { reported.push_back(status); });
    for (const auto& job : {a, b}) {
      job->on_done = [] {};
      ASSERT_TRUE(batcher.Enqueue(job).ok());
    }
    batcher.Stop();
  }
  ASSERT_EQ(reported.size(), 1u);
  EXPECT_TRUE(IsDeviceUnusable(reported[0]));
  EXPECT_EQ(a->status.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(b->status.code(), absl::StatusCode::kInternal);
  // An ordinary failure is not a device failure.
  EXPECT_FALSE(IsDeviceUnusable(absl::InternalError("cuBLASLt failed")));
  EXPECT_FALSE(IsDeviceUnusable(absl::OkStatus()));
}

}  // namespace
}  // namespace anchorserve
