// HostBufferCache with a pinner: blocks are pinned once, when they first enter the cache, and
// unpinned exactly once, before they are unmapped (evicted or at the cache's end).
#include "server/host_buffer.h"

#include <gtest/gtest.h>

#include <cstddef>
#include <cstring>
#include <map>
#include <set>

#include "prometheus/metric_family.h"
#include "server/metrics.h"

namespace anchorserve {
namespace {

constexpr int64_t kBlock = int64_t{1} << 20;  // the smallest mapped block

// Records pins; the memory stays as it is. Pin fails for blocks in `refuse`.
class FakePinner : public HostMemoryPinner {
 public:
  bool Pin(void* data, size_t bytes) override {
    ++pin_calls;
    if (refuse.count(data) > 0) return false;
    EXPECT_EQ(pinned.count(data), 0u) << "pinned twice";
    pinned[data] = bytes;
    return true;
  }
  void Unpin(void* data) override {
    ++unpin_calls;
    EXPECT_EQ(pinned.erase(data), 1u) << "unpinned a block that was not pinned";
  }

  std::map<void*, size_t> pinned;
  std::set<void*> refuse;
  int pin_calls = 0;
  int unpin_calls = 0;
};

TEST(HostBufferCacheTest, ABlockIsPinnedWhenCachedAndStaysPinnedWhileReused) {
  FakePinner pinner;
  {
    HostBufferCache cache(4 * kBlock);
    cache.SetPinner(&pinner);
    HostBuffer first = AllocateBytes(2 * kBlock, &cache);
    ASSERT_NE(first, nullptr);
    void* const block = first.get();
    std::memset(block, 1, 2 * kBlock);
    EXPECT_EQ(pinner.pin_calls, 0);  // in use: not yet
    first.reset();
    EXPECT_EQ(pinner.pinned.count(block), 1u);
    EXPECT_EQ(pinner.pinned[block], static_cast<size_t>(2 * kBlock));
    EXPECT_EQ(cache.pinned_bytes(), 2 * kBlock);
    EXPECT_EQ(cache.cached_bytes(), 2 * kBlock);

    for (int round = 0; round < 3; ++round) {
      // A smaller request of the same size class gets the same block.
      HostBuffer again = AllocateBytes(2 * kBlock - 100, &cache);
      ASSERT_EQ(again.get(), block);
      again[2 * kBlock - 101] = 7;
      again.reset();
    }
    EXPECT_EQ(pinner.pin_calls, 1);
    EXPECT_EQ(pinner.unpin_calls, 0);
    EXPECT_EQ(cache.pinned_bytes(), 2 * kBlock);
  }
  // The cache's end unmaps its blocks, unpinning them first.
  EXPECT_EQ(pinner.unpin_calls, 1);
  EXPECT_TRUE(pinner.pinned.empty());
}

TEST(HostBufferCacheTest, PinnedBytesAreAGauge) {
  MetricsRegistry metrics;
  auto gauge = [&metrics] {
    for (const prometheus::MetricFamily& family : metrics.registry()->Collect()) {
      if (family.name == "anchorserve_pinned_host_bytes") return family.metric.at(0).gauge.value;
    }
    return -1.0;
  };
  FakePinner pinner;
  {
    HostBufferCache cache(4 * kBlock, &metrics);
    cache.SetPinner(&pinner);
    HostBuffer a = AllocateBytes(2 * kBlock, &cache);
    ASSERT_NE(a, nullptr);
    EXPECT_EQ(gauge(), 0.0);
    a.reset();
    EXPECT_EQ(gauge(), 2.0 * kBlock);
  }
  EXPECT_EQ(gauge(), 0.0);  // unpinned when the cache unmapped it
}

TEST(HostBufferCacheTest, AnEvictedPinnedBlockIsUnpinnedAndAnUnpinnedOneIsNot) {
  FakePinner pinner;
  HostBufferCache cache(kBlock);  // room for one block
  cache.SetPinner(&pinner);
  HostBuffer a = AllocateBytes(kBlock, &cache);
  HostBuffer b = AllocateBytes(kBlock, &cache);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  void* const block_a = a.get();
  a.reset();  // cached, pinned
  b.reset();  // no room: unmapped, never pinned
  EXPECT_EQ(pinner.pin_calls, 1);
  EXPECT_EQ(pinner.unpin_calls, 0);

  HostBuffer reused = AllocateBytes(kBlock, &cache);
  ASSERT_EQ(reused.get(), block_a);
  HostBuffer fresh = AllocateBytes(kBlock, &cache);
  ASSERT_NE(fresh, nullptr);
  void* const block_fresh = fresh.get();
  fresh.reset();  // takes the room, pinned
  EXPECT_EQ(pinner.pinned.count(block_fresh), 1u);
  reused.reset();  // no room: the pinned block is unpinned, then unmapped
  EXPECT_EQ(pinner.unpin_calls, 1);
  EXPECT_EQ(pinner.pinned.count(block_a), 0u);
  EXPECT_EQ(cache.pinned_bytes(), kBlock);
}

TEST(HostBufferCacheTest, ABlockThePinnerRefusesIsCachedPageable) {
  FakePinner pinner;
  HostBufferCache cache(2 * kBlock);
  cache.SetPinner(&pinner);
  HostBuffer a = AllocateBytes(kBlock, &cache);
  ASSERT_NE(a, nullptr);
  void* const block = a.get();
  pinner.refuse.insert(block);
  a.reset();
  EXPECT_EQ(cache.cached_bytes(), kBlock);
  EXPECT_EQ(cache.pinned_bytes(), 0);
  HostBuffer again = AllocateBytes(kBlock, &cache);
  EXPECT_EQ(again.get(), block);
  again.reset();  // tried again: pinning may succeed later
  EXPECT_EQ(pinner.pin_calls, 2);
  EXPECT_EQ(pinner.unpin_calls, 0);
}

TEST(HostBufferCacheTest, WithoutAPinnerNothingIsPinned) {
  HostBufferCache cache(2 * kBlock);
  HostBuffer a = AllocateBytes(3 * kBlock / 2, &cache);
  ASSERT_NE(a, nullptr);
  a.reset();
  EXPECT_EQ(cache.cached_bytes(), 2 * kBlock);  // its power-of-two block
  EXPECT_EQ(cache.pinned_bytes(), 0);
}

TEST(HostBufferCacheTest, SmallBuffersBypassTheCache) {
  FakePinner pinner;
  HostBufferCache cache(2 * kBlock);
  cache.SetPinner(&pinner);
  HostBuffer small = AllocateBytes(4096, &cache);
  ASSERT_NE(small, nullptr);
  small.reset();
  EXPECT_EQ(cache.cached_bytes(), 0);
  EXPECT_EQ(pinner.pin_calls, 0);
}

}  // namespace
}  // namespace anchorserve
