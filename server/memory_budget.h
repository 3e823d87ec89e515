// Memory admission: one server-wide budget (--max_inflight_bytes) for the bytes calls hold in
// memory: request bytes received, queued and running, and output bytes waiting to be sent (Attend
// and AttendStream outputs, Prefill's KV buffers).
//
// Contract: a call that would exceed the budget is refused at once with RESOURCE_EXHAUSTED (the
// client may retry later or on another replica); nothing waits for room. Streaming uploads are
// charged as their bytes arrive, not when the header declares them, so a stalled or slow upload
// holds only what it has sent; a header whose declared bytes could not fit in what is free right
// now is refused before anything is received.
#pragma once

#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "server/metrics.h"

namespace anchorserve {

class MemoryBudget;

// Bytes charged to a MemoryBudget; given back when destroyed. Move-only.
class MemoryCharge {
 public:
  MemoryCharge() = default;
  MemoryCharge(MemoryCharge&& other) noexcept;
  MemoryCharge& operator=(MemoryCharge&& other) noexcept;
  MemoryCharge(const MemoryCharge&) = delete;
  MemoryCharge& operator=(const MemoryCharge&) = delete;
  ~MemoryCharge() { Release(); }

  // Adds `bytes` to this charge; RESOURCE_EXHAUSTED (nothing added) when the budget cannot hold
  // them. `what` names the bytes in the message ("chunk of q", "output").
  absl::Status Grow(int64_t bytes, absl::string_view what);
  // Gives back `bytes` of this charge (at most what it holds).
  void Shrink(int64_t bytes);
  void Release();
  int64_t bytes() const { return bytes_; }

 private:
  friend class MemoryBudget;
  MemoryCharge(MemoryBudget* budget, int64_t bytes) : budget_(budget), bytes_(bytes) {}

  MemoryBudget* budget_ = nullptr;
  int64_t bytes_ = 0;
};

class MemoryBudget {
 public:
  // `metrics` (optional) must outlive the budget.
  MemoryBudget(int64_t limit_bytes, MetricsRegistry* metrics);
  MemoryBudget(const MemoryBudget&) = delete;
  MemoryBudget& operator=(const MemoryBudget&) = delete;

  // A charge of `bytes`, or RESOURCE_EXHAUSTED naming `what`, the bytes in use and the limit (and
  // counted as a memory_budget refusal).
  absl::StatusOr<MemoryCharge> Charge(int64_t bytes, absl::string_view what);
  // An empty charge to Grow as bytes arrive.
  MemoryCharge EmptyCharge() { return MemoryCharge(this, 0); }
  // RESOURCE_EXHAUSTED when `bytes` do not fit in what is free now (nothing is charged).
  absl::Status CheckFits(int64_t bytes, absl::string_view what);

  int64_t limit() const { return limit_; }
  int64_t in_use() const;

 private:
  friend class MemoryCharge;
  absl::Status Take(int64_t bytes, absl::string_view what);
  void Give(int64_t bytes);
  absl::Status Exhausted(int64_t bytes, absl::string_view what, int64_t in_use) const;

  const int64_t limit_;
  MetricsRegistry* const metrics_;
  mutable absl::Mutex mu_;
  int64_t in_use_ ABSL_GUARDED_BY(mu_) = 0;
};

// --max_inflight_bytes as configured, or when 0 half of the memory this process may use: the
// smaller of the machine's physical memory and the cgroup limit (a container's memory limit).
int64_t ResolveInflightBytesLimit(int64_t configured);

}  // namespace anchorserve
