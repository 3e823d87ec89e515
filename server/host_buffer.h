// Host memory for tensor bytes (request inputs, outputs, KV copies). Large buffers are mapped
// from the kernel directly rather than taken from malloc's arenas: their pages become resident
// only as they are written (a declared-but-unsent upload costs nothing), and a freed buffer goes
// either to a small cache of mapped blocks (HostBufferCache, whose pages stay resident so the next
// request writes into them without page faults) or straight back to the system. The process's
// memory follows the memory budget's count plus the cache's bound, instead of the arenas'
// high-water mark.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "kernels/backend.h"
#include "server/metrics.h"

namespace anchorserve {

// Freed mapped blocks kept for reuse, in power-of-two sizes, at most `capacity_bytes` in all.
// With a pinner (the CUDA backend's), a block is page-locked when it first enters the cache and
// stays so until it is unmapped: reused buffers then go to and from the device without staging.
// Thread-safe. Must outlive every buffer allocated through it; the pinner must outlive it.
class HostBufferCache {
 public:
  // `metrics` (optional) must outlive the cache; it shows the pinned bytes.
  explicit HostBufferCache(int64_t capacity_bytes, MetricsRegistry* metrics = nullptr)
      : capacity_bytes_(capacity_bytes), metrics_(metrics) {}
  ~HostBufferCache();
  HostBufferCache(const HostBufferCache&) = delete;
  HostBufferCache& operator=(const HostBufferCache&) = delete;

  // From now on, blocks that enter the cache are pinned with `pinner`. Once, before the first
  // Give; later calls change nothing.
  void SetPinner(HostMemoryPinner* pinner);
  // A cached block of `block_bytes`, or null.
  void* Take(size_t block_bytes);
  // Keeps the block when there is room, else unmaps it.
  void Give(void* block, size_t block_bytes);
  int64_t cached_bytes() const;
  int64_t capacity_bytes() const { return capacity_bytes_; }
  // Bytes of blocks pinned now, cached or in use.
  int64_t pinned_bytes() const;

 private:
  // Unpins `block` if it is pinned, then unmaps it.
  void Release(void* block, size_t block_bytes);

  const int64_t capacity_bytes_;
  MetricsRegistry* const metrics_;
  mutable absl::Mutex mu_;
  std::map<size_t, std::vector<void*>> free_ ABSL_GUARDED_BY(mu_);
  int64_t cached_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  HostMemoryPinner* pinner_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::set<void*> pinned_ ABSL_GUARDED_BY(mu_);
  int64_t pinned_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

class HostBufferDeleter {
 public:
  HostBufferDeleter() = default;
  HostBufferDeleter(size_t bytes, HostBufferCache* cache) : bytes_(bytes), cache_(cache) {}
  void operator()(char* data) const;

 private:
  size_t bytes_ = 0;  // the mapping's size for mapped buffers
  HostBufferCache* cache_ = nullptr;
};

using HostBuffer = std::unique_ptr<char[], HostBufferDeleter>;

// Not zero-filled; null when the allocation fails. Large buffers come from `cache` when it holds
// a block of their size class and go back to it when freed.
HostBuffer AllocateBytes(int64_t bytes, HostBufferCache* cache = nullptr);

}  // namespace anchorserve
