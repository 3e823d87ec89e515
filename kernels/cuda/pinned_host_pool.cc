#include "kernels/cuda/pinned_host_pool.h"

#include <cuda_runtime_api.h>

namespace anchorserve::cuda {

PinnedHostPool::~PinnedHostPool() {
  absl::MutexLock lock(&mu_);
  for (auto& [size, blocks] : free_) {
    for (void* block : blocks) cudaFreeHost(block);
  }
}

int64_t PinnedHostPool::BlockBytes(int64_t bytes) {
  int64_t block = int64_t{1} << 20;
  while (block < bytes) block <<= 1;
  return block;
}

void* PinnedHostPool::Take(int64_t bytes) {
  if (bytes <= 0) return nullptr;
  const int64_t block_bytes = BlockBytes(bytes);
  absl::MutexLock lock(&mu_);
  if (auto found = free_.find(block_bytes); found != free_.end() && !found->second.empty()) {
    void* block = found->second.back();
    found->second.pop_back();
    return block;
  }
  if (allocated_bytes_ + block_bytes > capacity_bytes_) return nullptr;
  void* block = nullptr;
  // Portable: usable from every thread and context, whichever thread allocates it.
  if (cudaSetDevice(device_) != cudaSuccess ||
      cudaHostAlloc(&block, static_cast<size_t>(block_bytes), cudaHostAllocPortable) !=
          cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  allocated_bytes_ += block_bytes;
  return block;
}

void PinnedHostPool::Give(void* block, int64_t bytes) {
  if (block == nullptr) return;
  absl::MutexLock lock(&mu_);
  free_[BlockBytes(bytes)].push_back(block);
}

int64_t PinnedHostPool::allocated_bytes() const {
  absl::MutexLock lock(&mu_);
  return allocated_bytes_;
}

}  // namespace anchorserve::cuda
