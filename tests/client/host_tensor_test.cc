// PrefaultReserved: the reserved storage of a received tensor is mapped in one call, so that
// appending up to the capacity takes no page faults, and the bytes already held are untouched.
#include "client/host_tensor.h"

#include <sys/mman.h>
#include <sys/resource.h>

#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/test_util/sanitizers.h"

namespace anchorserve {
namespace {

int64_t MinorFaults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

// Whether this kernel has MADV_POPULATE_WRITE (Linux >= 5.14).
bool KernelCanPopulate() {
#ifdef MADV_POPULATE_WRITE
  void* page = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (page == MAP_FAILED) return false;
  const bool ok = madvise(page, 4096, MADV_POPULATE_WRITE) == 0;
  munmap(page, 4096);
  return ok;
#else
  return false;
#endif
}

TEST(PrefaultReservedTest, AppendingUpToCapacityTakesNoPageFaults) {
  if (kUnderAddressSanitizer || kUnderThreadSanitizer) {
    GTEST_SKIP() << "the sanitizers fault in their own shadow memory on every copy";
  }
  if (!KernelCanPopulate()) GTEST_SKIP() << "this kernel has no MADV_POPULATE_WRITE";
  constexpr size_t kBytes = size_t{16} << 20;  // 4096 pages
  std::mt19937 random(std::random_device{}());
  std::vector<uint8_t> source(kBytes);
  for (uint8_t& byte : source) byte = static_cast<uint8_t>(random());

  std::vector<uint8_t> target;
  target.reserve(kBytes);
  constexpr size_t kHead = 1000;  // bytes held before the call, not page-aligned
  target.insert(target.end(), source.begin(), source.begin() + kHead);
  PrefaultReserved(target);
  ASSERT_EQ(target.size(), kHead);
  const int64_t before = MinorFaults();
  target.insert(target.end(), source.begin() + kHead, source.end());
  const int64_t faults = MinorFaults() - before;
  EXPECT_LT(faults, 64) << "appending 16 MiB into prefaulted storage took " << faults
                        << " page faults (4096 without it)";
  EXPECT_EQ(target, source);
}

TEST(PrefaultReservedTest, EmptyAndFullVectorsAreLeftAlone) {
  std::vector<uint8_t> empty;
  PrefaultReserved(empty);
  EXPECT_TRUE(empty.empty());
  std::vector<uint8_t> full(12345, 7);
  full.shrink_to_fit();
  PrefaultReserved(full);
  EXPECT_EQ(full, std::vector<uint8_t>(12345, 7));
}

}  // namespace
}  // namespace anchorserve
