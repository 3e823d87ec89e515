// TSan build only (scripts/sanitize.sh tsan): tells ThreadSanitizer about Abseil's
// synchronization, which it cannot see by itself.
//
// Why: Debian's libabsl_synchronization is not instrumented. absl::Mutex locks with atomics and
// futex system calls inside that library, so TSan sees no happens-before edge between one
// thread's Unlock and the next thread's Lock, and reports every access to our ABSL_GUARDED_BY
// fields as a data race. The same holds for CondVar, Notification and BlockingCounter.
//
// How: the linker's --wrap=SYMBOL sends our objects' calls of these functions to the __wrap_
// functions below, which call the real one (__real_) and add TSan's own mutex annotations
// (sanitizer/tsan_interface.h): the lock/unlock events TSan would have seen had the library been
// instrumented. Only calls from our code are wrapped; gRPC's internal use of Abseil is invisible
// to TSan and needs nothing (TSan only checks instrumented accesses).
//
// Mutex::Unlock and the waits run the Condition functions of waiters inside the library; those
// are our (instrumented) code running while the real lock is held but after TSan was told it is
// released, so their reads are ignored for the duration of the real call (AnnotateIgnoreReads/
// Writes). This loses race detection inside Condition functions only; they read guarded state.
//
// The wrapped symbols are listed in tsan_absl_wrapped_symbols.txt (mangled for Debian 12's
// Abseil 20220623, inline namespace debian3; the build fails to link if they ever change, since
// the __real_ symbols would be missing).
#include <sanitizer/tsan_interface.h>

#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

extern "C" {
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}

namespace {

// Accesses of instrumented code called back from inside the library (Condition functions) are
// not checked while it runs.
class IgnoreAccesses {
 public:
  IgnoreAccesses() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~IgnoreAccesses() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
};

void Locked(void* mu, unsigned flags = 0) {
  __tsan_mutex_pre_lock(mu, flags);
  __tsan_mutex_post_lock(mu, flags, 0);
}

void Unlocked(void* mu, unsigned flags = 0) {
  __tsan_mutex_pre_unlock(mu, flags);
  __tsan_mutex_post_unlock(mu, flags);
}

}  // namespace

using absl::Condition;
using absl::Duration;
using absl::Mutex;
using absl::Time;

extern "C" {

// --- Mutex ---
void __real__ZN4absl7debian35Mutex4LockEv(Mutex* mu);
void __wrap__ZN4absl7debian35Mutex4LockEv(Mutex* mu) {
  __tsan_mutex_pre_lock(mu, 0);
  __real__ZN4absl7debian35Mutex4LockEv(mu);
  __tsan_mutex_post_lock(mu, 0, 0);
}

void __real__ZN4absl7debian35Mutex6UnlockEv(Mutex* mu);
void __wrap__ZN4absl7debian35Mutex6UnlockEv(Mutex* mu) {
  __tsan_mutex_pre_unlock(mu, 0);
  {
    IgnoreAccesses ignore;  // wakes waiters: runs their Conditions
    __real__ZN4absl7debian35Mutex6UnlockEv(mu);
  }
  __tsan_mutex_post_unlock(mu, 0);
}

void __real__ZN4absl7debian35Mutex10ReaderLockEv(Mutex* mu);
void __wrap__ZN4absl7debian35Mutex10ReaderLockEv(Mutex* mu) {
  __tsan_mutex_pre_lock(mu, __tsan_mutex_read_lock);
  __real__ZN4absl7debian35Mutex10ReaderLockEv(mu);
  __tsan_mutex_post_lock(mu, __tsan_mutex_read_lock, 0);
}

void __real__ZN4absl7debian35Mutex12ReaderUnlockEv(Mutex* mu);
void __wrap__ZN4absl7debian35Mutex12ReaderUnlockEv(Mutex* mu) {
  __tsan_mutex_pre_unlock(mu, __tsan_mutex_read_lock);
  {
    IgnoreAccesses ignore;
    __real__ZN4absl7debian35Mutex12ReaderUnlockEv(mu);
  }
  __tsan_mutex_post_unlock(mu, __tsan_mutex_read_lock);
}

bool __real__ZN4absl7debian35Mutex7TryLockEv(Mutex* mu);
bool __wrap__ZN4absl7debian35Mutex7TryLockEv(Mutex* mu) {
  __tsan_mutex_pre_lock(mu, __tsan_mutex_try_lock);
  const bool locked = __real__ZN4absl7debian35Mutex7TryLockEv(mu);
  __tsan_mutex_post_lock(
      mu, locked ? __tsan_mutex_try_lock : __tsan_mutex_try_lock | __tsan_mutex_try_lock_failed, 0);
  return locked;
}

void __real__ZN4absl7debian35MutexD1Ev(Mutex* mu);
void __wrap__ZN4absl7debian35MutexD1Ev(Mutex* mu) {
  __tsan_mutex_destroy(mu, 0);
  __real__ZN4absl7debian35MutexD1Ev(mu);
}

// Await and LockWhen give the lock up while they wait and take it back: in TSan's terms an
// unlock and a lock around the real call.
void __real__ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE(Mutex* mu, const Condition& cond);
void __wrap__ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE(Mutex* mu, const Condition& cond) {
  Unlocked(mu);
  {
    IgnoreAccesses ignore;
    __real__ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE(mu, cond);
  }
  Locked(mu);
}

bool __real__ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE(
    Mutex* mu, const Condition& cond, Duration timeout);
bool __wrap__ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE(
    Mutex* mu, const Condition& cond, Duration timeout) {
  Unlocked(mu);
  bool result;
  {
    IgnoreAccesses ignore;
    result = __real__ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE(
        mu, cond, timeout);
  }
  Locked(mu);
  return result;
}

bool __real__ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE(
    Mutex* mu, const Condition& cond, Time deadline);
bool __wrap__ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE(
    Mutex* mu, const Condition& cond, Time deadline) {
  Unlocked(mu);
  bool result;
  {
    IgnoreAccesses ignore;
    result = __real__ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE(mu, cond,
                                                                                          deadline);
  }
  Locked(mu);
  return result;
}

void __real__ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE(Mutex* mu, const Condition& cond);
void __wrap__ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE(Mutex* mu, const Condition& cond) {
  __tsan_mutex_pre_lock(mu, 0);
  {
    IgnoreAccesses ignore;
    __real__ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE(mu, cond);
  }
  __tsan_mutex_post_lock(mu, 0, 0);
}

// --- CondVar: the mutex is released for the wait and held again on return ---
void __real__ZN4absl7debian37CondVar4WaitEPNS0_5MutexE(absl::CondVar* cv, Mutex* mu);
void __wrap__ZN4absl7debian37CondVar4WaitEPNS0_5MutexE(absl::CondVar* cv, Mutex* mu) {
  Unlocked(mu);
  __real__ZN4absl7debian37CondVar4WaitEPNS0_5MutexE(cv, mu);
  Locked(mu);
}

bool __real__ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE(absl::CondVar* cv,
                                                                                 Mutex* mu,
                                                                                 Duration timeout);
bool __wrap__ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE(absl::CondVar* cv,
                                                                                 Mutex* mu,
                                                                                 Duration timeout) {
  Unlocked(mu);
  const bool timed_out =
      __real__ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE(cv, mu, timeout);
  Locked(mu);
  return timed_out;
}

bool __real__ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE(absl::CondVar* cv,
                                                                              Mutex* mu,
                                                                              Time deadline);
bool __wrap__ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE(absl::CondVar* cv,
                                                                              Mutex* mu,
                                                                              Time deadline) {
  Unlocked(mu);
  const bool timed_out =
      __real__ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE(cv, mu, deadline);
  Locked(mu);
  return timed_out;
}

// --- Notification: Notify releases, the waits (and the inline HasBeenNotified, an acquire load
// of the flag) acquire. ---
void __real__ZN4absl7debian312Notification6NotifyEv(absl::Notification* n);
void __wrap__ZN4absl7debian312Notification6NotifyEv(absl::Notification* n) {
  __tsan_release(n);
  // HasBeenNotified() is inline: an acquire load of the flag that follows the Mutex member.
  static_assert(sizeof(absl::Notification) == sizeof(Mutex) + sizeof(std::atomic<bool>) + 7);
  __tsan_release(reinterpret_cast<char*>(n) + sizeof(Mutex));
  __real__ZN4absl7debian312Notification6NotifyEv(n);
}

void __real__ZNK4absl7debian312Notification19WaitForNotificationEv(const absl::Notification* n);
void __wrap__ZNK4absl7debian312Notification19WaitForNotificationEv(const absl::Notification* n) {
  __real__ZNK4absl7debian312Notification19WaitForNotificationEv(n);
  __tsan_acquire(const_cast<absl::Notification*>(n));
}

bool __real__ZNK4absl7debian312Notification30WaitForNotificationWithTimeoutENS0_8DurationE(
    const absl::Notification* n, Duration timeout);
bool __wrap__ZNK4absl7debian312Notification30WaitForNotificationWithTimeoutENS0_8DurationE(
    const absl::Notification* n, Duration timeout) {
  const bool notified =
      __real__ZNK4absl7debian312Notification30WaitForNotificationWithTimeoutENS0_8DurationE(
          n, timeout);
  if (notified) __tsan_acquire(const_cast<absl::Notification*>(n));
  return notified;
}

bool __real__ZNK4absl7debian312Notification31WaitForNotificationWithDeadlineENS0_4TimeE(
    const absl::Notification* n, Time deadline);
bool __wrap__ZNK4absl7debian312Notification31WaitForNotificationWithDeadlineENS0_4TimeE(
    const absl::Notification* n, Time deadline) {
  const bool notified =
      __real__ZNK4absl7debian312Notification31WaitForNotificationWithDeadlineENS0_4TimeE(n,
                                                                                         deadline);
  if (notified) __tsan_acquire(const_cast<absl::Notification*>(n));
  return notified;
}

// --- BlockingCounter: each DecrementCount releases, Wait acquires ---
bool __real__ZN4absl7debian315BlockingCounter14DecrementCountEv(absl::BlockingCounter* counter);
bool __wrap__ZN4absl7debian315BlockingCounter14DecrementCountEv(absl::BlockingCounter* counter) {
  __tsan_release(counter);
  return __real__ZN4absl7debian315BlockingCounter14DecrementCountEv(counter);
}

void __real__ZN4absl7debian315BlockingCounter4WaitEv(absl::BlockingCounter* counter);
void __wrap__ZN4absl7debian315BlockingCounter4WaitEv(absl::BlockingCounter* counter) {
  __real__ZN4absl7debian315BlockingCounter4WaitEv(counter);
  __tsan_acquire(counter);
}

}  // extern "C"
