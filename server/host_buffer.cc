#include "server/host_buffer.h"

#include <sys/mman.h>

#include <new>
#include <utility>
#include <vector>

namespace anchorserve {
namespace {

// Below this, malloc's arenas serve small buffers well (and faster).
constexpr size_t kMappedBytes = size_t{1} << 20;

size_t BlockBytes(size_t bytes) {
  size_t block = kMappedBytes;
  while (block < bytes) block <<= 1;
  return block;
}

}  // namespace

HostBufferCache::~HostBufferCache() {
  std::vector<std::pair<void*, size_t>> blocks;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [size, sized] : free_) {
      for (void* block : sized) blocks.emplace_back(block, size);
    }
    free_.clear();
  }
  for (auto [block, size] : blocks) Release(block, size);
}

void HostBufferCache::SetPinner(HostMemoryPinner* pinner) {
  absl::MutexLock lock(&mu_);
  if (pinner_ == nullptr) pinner_ = pinner;  // pinned blocks are unpinned with the same one
}

void* HostBufferCache::Take(size_t block_bytes) {
  absl::MutexLock lock(&mu_);
  auto found = free_.find(block_bytes);
  if (found == free_.end() || found->second.empty()) return nullptr;
  void* block = found->second.back();
  found->second.pop_back();
  cached_bytes_ -= static_cast<int64_t>(block_bytes);
  return block;
}

void HostBufferCache::Give(void* block, size_t block_bytes) {
  HostMemoryPinner* pin_with = nullptr;
  {
    absl::MutexLock lock(&mu_);
    if (cached_bytes_ + static_cast<int64_t>(block_bytes) <= capacity_bytes_) {
      cached_bytes_ += static_cast<int64_t>(block_bytes);
      if (pinner_ == nullptr || pinned_.count(block) > 0) {
        free_[block_bytes].push_back(block);
        return;
      }
      // Listed once pinned: pinning takes milliseconds, not to be spent under the lock.
      pin_with = pinner_;
    }
  }
  if (pin_with == nullptr) {  // no room
    Release(block, block_bytes);
    return;
  }
  const bool pinned = pin_with->Pin(block, block_bytes);
  absl::MutexLock lock(&mu_);
  if (pinned) {
    pinned_.insert(block);
    pinned_bytes_ += static_cast<int64_t>(block_bytes);
    if (metrics_ != nullptr) metrics_->AddPinnedHostBytes(static_cast<int64_t>(block_bytes));
  }
  free_[block_bytes].push_back(block);
}

void HostBufferCache::Release(void* block, size_t block_bytes) {
  HostMemoryPinner* pinned_with = nullptr;
  {
    absl::MutexLock lock(&mu_);
    if (pinned_.erase(block) > 0) {
      pinned_with = pinner_;
      pinned_bytes_ -= static_cast<int64_t>(block_bytes);
      if (metrics_ != nullptr) metrics_->AddPinnedHostBytes(-static_cast<int64_t>(block_bytes));
    }
  }
  if (pinned_with != nullptr) pinned_with->Unpin(block);
  munmap(block, block_bytes);
}

int64_t HostBufferCache::cached_bytes() const {
  absl::MutexLock lock(&mu_);
  return cached_bytes_;
}

int64_t HostBufferCache::pinned_bytes() const {
  absl::MutexLock lock(&mu_);
  return pinned_bytes_;
}

void HostBufferDeleter::operator()(char* data) const {
  if (data == nullptr) return;
  if (bytes_ < kMappedBytes) {
    delete[] data;
  } else if (cache_ != nullptr) {
    cache_->Give(data, bytes_);
  } else {
    munmap(data, bytes_);
  }
}

HostBuffer AllocateBytes(int64_t bytes, HostBufferCache* cache) {
  const size_t size = static_cast<size_t>(bytes);
  if (size < kMappedBytes) {
    return HostBuffer(new (std::nothrow) char[size], HostBufferDeleter(size, nullptr));
  }
  // With a cache, whole blocks of a size class, so that a freed one fits the next request.
  const size_t mapped = cache != nullptr ? BlockBytes(size) : size;
  if (cache != nullptr) {
    if (void* block = cache->Take(mapped); block != nullptr) {
      return HostBuffer(static_cast<char*>(block), HostBufferDeleter(mapped, cache));
    }
  }
  void* block = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (block == MAP_FAILED) return HostBuffer(nullptr, HostBufferDeleter(mapped, cache));
  return HostBuffer(static_cast<char*>(block), HostBufferDeleter(mapped, cache));
}

}  // namespace anchorserve
