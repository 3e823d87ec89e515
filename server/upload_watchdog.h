// Cancels streaming uploads that stall: a client that sends a header (or some chunks) and then
// nothing would otherwise hold its call, its buffers and its share of the memory budget forever.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/clock.h"

namespace anchorserve {

// One watched upload, owned by its reactor.
class WatchedUpload {
 public:
  // `on_stalled` runs on the watchdog's thread, at most once, while the watchdog holds its lock:
  // it may take the reactor's lock and Finish the call but must not call the watchdog.
  explicit WatchedUpload(absl::AnyInvocable<void()> on_stalled)
      : on_stalled_(std::move(on_stalled)) {}

  // A message arrived (lock-free; called from the reactor's reactions).
  void Touch(absl::Time now) { last_activity_ns_.store(absl::ToUnixNanos(now)); }
  // Receiving is over (all bytes in, or the call is finishing): no longer a stall candidate.
  void Done() { done_.store(true); }

 private:
  friend class UploadWatchdog;
  std::atomic<int64_t> last_activity_ns_{0};
  std::atomic<bool> done_{false};
  bool fired_ = false;  // under the watchdog's lock
  absl::AnyInvocable<void()> on_stalled_;
};

class UploadWatchdog {
 public:
  // Checks every `timeout` / 4 (at least every second). `clock` must outlive the watchdog.
  UploadWatchdog(absl::Duration timeout, Clock* clock);
  ~UploadWatchdog();
  UploadWatchdog(const UploadWatchdog&) = delete;
  UploadWatchdog& operator=(const UploadWatchdog&) = delete;

  absl::Duration timeout() const { return timeout_; }

  // Starts watching (the upload counts as active now).
  void Watch(WatchedUpload* upload);
  // Stops watching; once it returns, `on_stalled` is not running and never will.
  void Unwatch(WatchedUpload* upload);

  // One scan (the thread's body; public for tests with a fake clock).
  void CheckNow();

 private:
  void Loop();

  const absl::Duration timeout_;
  Clock* const clock_;
  absl::Mutex mu_;
  absl::flat_hash_set<WatchedUpload*> watched_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace anchorserve
