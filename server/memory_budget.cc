#include "server/memory_budget.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <limits>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace anchorserve {

MemoryCharge::MemoryCharge(MemoryCharge&& other) noexcept
    : budget_(std::exchange(other.budget_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

MemoryCharge& MemoryCharge::operator=(MemoryCharge&& other) noexcept {
  if (this != &other) {
    Release();
    budget_ = std::exchange(other.budget_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

absl::Status MemoryCharge::Grow(int64_t bytes, absl::string_view what) {
  if (budget_ == nullptr) return absl::InternalError("Grow on a charge without a budget");
  if (absl::Status status = budget_->Take(bytes, what); !status.ok()) return status;
  bytes_ += bytes;
  return absl::OkStatus();
}

void MemoryCharge::Shrink(int64_t bytes) {
  bytes = std::clamp<int64_t>(bytes, 0, bytes_);
  if (budget_ != nullptr && bytes > 0) budget_->Give(bytes);
  bytes_ -= bytes;
}

void MemoryCharge::Release() { Shrink(bytes_); }

MemoryBudget::MemoryBudget(int64_t limit_bytes, MetricsRegistry* metrics)
    : limit_(limit_bytes), metrics_(metrics) {
  if (metrics_ != nullptr) metrics_->SetInflightBytesLimit(limit_);
}

absl::StatusOr<MemoryCharge> MemoryBudget::Charge(int64_t bytes, absl::string_view what) {
  if (absl::Status status = Take(bytes, what); !status.ok()) return status;
  return MemoryCharge(this, bytes);
}

absl::Status MemoryBudget::CheckFits(int64_t bytes, absl::string_view what) {
  absl::MutexLock lock(&mu_);
  if (bytes <= limit_ - in_use_) return absl::OkStatus();
  return Exhausted(bytes, what, in_use_);
}

int64_t MemoryBudget::in_use() const {
  absl::MutexLock lock(&mu_);
  return in_use_;
}

absl::Status MemoryBudget::Take(int64_t bytes, absl::string_view what) {
  if (bytes < 0) return absl::InternalError(absl::StrCat("negative charge for ", what));
  {
    absl::MutexLock lock(&mu_);
    if (bytes > limit_ - in_use_) return Exhausted(bytes, what, in_use_);
    in_use_ += bytes;
  }
  if (metrics_ != nullptr) metrics_->AddInflightBytes(bytes);
  return absl::OkStatus();
}

void MemoryBudget::Give(int64_t bytes) {
  {
    absl::MutexLock lock(&mu_);
    in_use_ -= bytes;
  }
  if (metrics_ != nullptr) metrics_->AddInflightBytes(-bytes);
}

absl::Status MemoryBudget::Exhausted(int64_t bytes, absl::string_view what, int64_t in_use) const {
  if (metrics_ != nullptr) metrics_->CountRefusal(Refusal::kMemoryBudget);
  if (bytes > limit_) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what, " needs ", bytes,
                     " bytes, more than the server's whole memory budget "
                     "(--max_inflight_bytes=",
                     limit_, ")"));
  }
  return absl::ResourceExhaustedError(
      absl::StrCat(what, " needs ", bytes, " bytes; the server's memory budget holds ", in_use,
                   " of ", limit_, " bytes (--max_inflight_bytes) for other calls; retry later"));
}

namespace {

// The first line of `path` as a byte count; -1 when absent, "max" or unparsable.
int64_t ReadBytesFile(const char* path) {
  std::ifstream in(path);
  std::string line;
  if (!in || !std::getline(in, line)) return -1;
  int64_t value = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(line), &value) || value <= 0) return -1;
  return value;
}

}  // namespace

int64_t ResolveInflightBytesLimit(int64_t configured) {
  if (configured > 0) return configured;
  int64_t usable = std::numeric_limits<int64_t>::max();
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page_size > 0) usable = int64_t{pages} * page_size;
  // cgroup v2, then v1 (whose "no limit" is a huge number, larger than physical memory).
  for (const char* path :
       {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    const int64_t limit = ReadBytesFile(path);
    if (limit > 0) usable = std::min(usable, limit);
  }
  if (usable == std::numeric_limits<int64_t>::max()) usable = int64_t{8} << 30;
  return usable / 2;
}

}  // namespace anchorserve
