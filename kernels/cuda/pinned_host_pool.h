// Page-locked host memory for request tensors: the server receives Q/K/V straight into it and the
// device copies from and to it at the link's rate, with no staging copy. Blocks come in
// power-of-two sizes from 1 MiB, are allocated on first need and kept for reuse up to a total
// capacity; beyond it Take answers null and the caller falls back to ordinary memory.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "kernels/backend.h"

namespace anchorserve::cuda {

class PinnedHostPool final : public HostMemoryPool {
 public:
  PinnedHostPool(int device, int64_t capacity_bytes)
      : device_(device), capacity_bytes_(capacity_bytes) {}
  ~PinnedHostPool() override;
  PinnedHostPool(const PinnedHostPool&) = delete;
  PinnedHostPool& operator=(const PinnedHostPool&) = delete;

  void* Take(int64_t bytes) override;
  void Give(void* block, int64_t bytes) override;

  int64_t allocated_bytes() const;

 private:
  static int64_t BlockBytes(int64_t bytes);

  const int device_;
  const int64_t capacity_bytes_;
  mutable absl::Mutex mu_;
  std::map<int64_t, std::vector<void*>> free_ ABSL_GUARDED_BY(mu_);  // by block size
  int64_t allocated_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace anchorserve::cuda
