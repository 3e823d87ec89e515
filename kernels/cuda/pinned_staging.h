// Host<->device copies. Pageable memory goes through a few pinned buffers: a copy from pageable
// memory is staged by the driver through its own small pinned buffer and runs far below the
// link's rate; here the host copies a slice into one of our pinned buffers while the DMA engine
// moves the previous slice, so a copy runs at about memcpy speed. Ranges registered with
// PinnedHostRanges (the server's reused request buffers) are copied directly at the link's rate.
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_event.h"

namespace anchorserve::cuda {

// Host ranges page-locked with cudaHostRegister for `device`.
class PinnedHostRanges : public HostMemoryPinner {
 public:
  explicit PinnedHostRanges(int device) : device_(device) {}
  ~PinnedHostRanges() override;  // unregisters what is still registered
  PinnedHostRanges(const PinnedHostRanges&) = delete;
  PinnedHostRanges& operator=(const PinnedHostRanges&) = delete;

  bool Pin(void* data, size_t bytes) override;
  void Unpin(void* data) override;
  // Whether [data, data + bytes) lies inside one registered range.
  bool Contains(const void* data, int64_t bytes) const;
  int64_t pinned_bytes() const;

 private:
  const int device_;
  mutable absl::Mutex mu_;
  std::map<uintptr_t, size_t> ranges_ ABSL_GUARDED_BY(mu_);  // start -> bytes
  int64_t pinned_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

class PinnedStaging {
 public:
  // Two pinned buffers of `slice_bytes` each, on the current device. Copies of ranges that
  // `pinned` (optional; must outlive this) contains skip the buffers.
  static absl::StatusOr<std::unique_ptr<PinnedStaging>> Create(
      int64_t slice_bytes, const PinnedHostRanges* pinned = nullptr);
  ~PinnedStaging();
  PinnedStaging(const PinnedStaging&) = delete;
  PinnedStaging& operator=(const PinnedStaging&) = delete;

  // Enqueues the copy of `bytes` from `host` to `device` on `stream`. Pageable `host` is no
  // longer read when this returns (the DMA may still run); pinned `host` is read until the
  // stream's work completes.
  absl::Status Upload(void* device, const void* host, int64_t bytes, cudaStream_t stream);
  // Copies `bytes` from `device` to `host` after the work queued on `stream`. Pageable `host`
  // holds every byte when this returns; pinned `host` once the stream's work completes.
  absl::Status Download(void* host, const void* device, int64_t bytes, cudaStream_t stream);

 private:
  static constexpr int kSlots = 2;
  PinnedStaging(int64_t slice_bytes, std::array<char*, kSlots> slots,
                const PinnedHostRanges* pinned)
      : slice_bytes_(slice_bytes), slots_(slots), pinned_(pinned) {}
  bool IsPinned(const void* host, int64_t bytes) const {
    return pinned_ != nullptr && pinned_->Contains(host, bytes);
  }

  const int64_t slice_bytes_;
  std::array<char*, kSlots> slots_;
  std::array<Event, kSlots> done_;  // the slot's last DMA finished
  const PinnedHostRanges* const pinned_;
};

}  // namespace anchorserve::cuda
