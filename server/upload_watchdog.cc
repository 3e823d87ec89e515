#include "server/upload_watchdog.h"

#include <algorithm>

namespace anchorserve {

UploadWatchdog::UploadWatchdog(absl::Duration timeout, Clock* clock)
    : timeout_(timeout), clock_(clock) {
  thread_ = std::thread([this] { Loop(); });
}

UploadWatchdog::~UploadWatchdog() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
}

void UploadWatchdog::Watch(WatchedUpload* upload) {
  upload->Touch(clock_->Now());
  absl::MutexLock lock(&mu_);
  watched_.insert(upload);
}

void UploadWatchdog::Unwatch(WatchedUpload* upload) {
  absl::MutexLock lock(&mu_);
  watched_.erase(upload);
}

void UploadWatchdog::CheckNow() {
  const int64_t now_ns = absl::ToUnixNanos(clock_->Now());
  const int64_t timeout_ns = absl::ToInt64Nanoseconds(timeout_);
  absl::MutexLock lock(&mu_);
  for (WatchedUpload* upload : watched_) {
    if (upload->fired_ || upload->done_.load()) continue;
    if (now_ns - upload->last_activity_ns_.load() < timeout_ns) continue;
    upload->fired_ = true;
    upload->on_stalled_();
  }
}

void UploadWatchdog::Loop() {
  const absl::Duration period = std::min(timeout_ / 4, absl::Seconds(1));
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(&stopping_), period);
      if (stopping_) return;
    }
    CheckNow();
  }
}

}  // namespace anchorserve
