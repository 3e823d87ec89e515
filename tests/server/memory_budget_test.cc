#include "server/memory_budget.h"

#include <atomic>
#include <utility>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/clock.h"
#include "server/metrics.h"
#include "server/upload_watchdog.h"

namespace anchorserve {
namespace {

using ::testing::HasSubstr;

TEST(MemoryBudgetTest, ChargesUntilTheLimitAndRefusesBeyondIt) {
  MetricsRegistry metrics;
  MemoryBudget budget(1000, &metrics);
  absl::StatusOr<MemoryCharge> a = budget.Charge(600, "first");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(budget.in_use(), 600);
  absl::StatusOr<MemoryCharge> b = budget.Charge(401, "second");
  EXPECT_EQ(b.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(b.status().message(), HasSubstr("second needs 401 bytes"));
  EXPECT_THAT(b.status().message(), HasSubstr("holds 600 of 1000"));
  EXPECT_THAT(b.status().message(), HasSubstr("--max_inflight_bytes"));
  EXPECT_EQ(budget.in_use(), 600);  // a refusal charges nothing
  absl::StatusOr<MemoryCharge> c = budget.Charge(400, "third");
  EXPECT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(budget.in_use(), 1000);
  a->Release();
  EXPECT_EQ(budget.in_use(), 400);
  {
    MemoryCharge moved = *std::move(c);
    EXPECT_EQ(moved.bytes(), 400);
  }  // destroyed: given back once
  EXPECT_EQ(budget.in_use(), 0);
}

TEST(MemoryBudgetTest, MoreThanTheWholeBudgetSaysSo) {
  MemoryBudget budget(1000, nullptr);
  absl::StatusOr<MemoryCharge> big = budget.Charge(1001, "request");
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(big.status().message(), HasSubstr("more than the server's whole memory budget"));
  EXPECT_EQ(budget.CheckFits(1001, "request").code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(budget.CheckFits(1000, "request").ok());
}

TEST(MemoryBudgetTest, GrowsAndShrinksIncrementally) {
  MemoryBudget budget(100, nullptr);
  MemoryCharge charge = budget.EmptyCharge();
  ASSERT_TRUE(charge.Grow(60, "chunk").ok());
  const absl::Status refused = charge.Grow(41, "chunk of q");
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.message(), HasSubstr("chunk of q"));
  EXPECT_EQ(charge.bytes(), 60);
  charge.Shrink(25);
  EXPECT_EQ(budget.in_use(), 35);
  charge.Shrink(1000);  // at most what it holds
  EXPECT_EQ(budget.in_use(), 0);
  EXPECT_EQ(charge.bytes(), 0);
  EXPECT_EQ(MemoryCharge().Grow(1, "x").code(), absl::StatusCode::kInternal);
}

TEST(MemoryBudgetTest, AutomaticLimitIsHalfOfAPositiveMemorySize) {
  EXPECT_EQ(ResolveInflightBytesLimit(12345), 12345);
  const int64_t automatic = ResolveInflightBytesLimit(0);
  EXPECT_GT(automatic, int64_t{64} << 20);
}

TEST(UploadWatchdogTest, FiresOnceAfterTheTimeoutAndNotForFinishedUploads) {
  FakeClock clock;
  UploadWatchdog watchdog(absl::Seconds(30), &clock);
  std::atomic<int> stalled{0}, finished_stalled{0};
  WatchedUpload upload([&] { stalled++; });
  WatchedUpload finished([&] { finished_stalled++; });
  watchdog.Watch(&upload);
  watchdog.Watch(&finished);
  finished.Done();
  clock.Advance(absl::Seconds(20));
  upload.Touch(clock.Now());  // a message arrived: the 30 s start again
  clock.Advance(absl::Seconds(29));
  watchdog.CheckNow();
  EXPECT_EQ(stalled.load(), 0);
  clock.Advance(absl::Seconds(1));
  watchdog.CheckNow();
  watchdog.CheckNow();
  EXPECT_EQ(stalled.load(), 1);
  EXPECT_EQ(finished_stalled.load(), 0);
  watchdog.Unwatch(&upload);
  watchdog.Unwatch(&finished);
}

TEST(UploadWatchdogTest, ItsThreadFindsStalledUploadsOnItsOwn) {
  RealClock clock;
  UploadWatchdog watchdog(absl::Milliseconds(40), &clock);
  absl::Notification fired;
  WatchedUpload upload([&] { fired.Notify(); });
  watchdog.Watch(&upload);
  EXPECT_TRUE(fired.WaitForNotificationWithTimeout(absl::Seconds(10)));
  watchdog.Unwatch(&upload);
}

}  // namespace
}  // namespace anchorserve
