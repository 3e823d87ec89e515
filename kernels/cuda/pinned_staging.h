// Host<->device copies of pageable memory through a few pinned buffers. A copy from pageable
// memory is staged by the driver through its own small pinned buffer and runs far below the
// link's rate; here the host copies a slice into one of our pinned buffers while the DMA engine
// moves the previous slice, so a copy runs at about memcpy speed.
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/cuda_event.h"

namespace anchorserve::cuda {

class PinnedStaging {
 public:
  // Two pinned buffers of `slice_bytes` each, on the current device.
  static absl::StatusOr<std::unique_ptr<PinnedStaging>> Create(int64_t slice_bytes);
  ~PinnedStaging();
  PinnedStaging(const PinnedStaging&) = delete;
  PinnedStaging& operator=(const PinnedStaging&) = delete;

  // Enqueues the copy of `bytes` from pageable `host` to `device` on `stream`; returns once the
  // last slice is enqueued (host memory is no longer read then; the DMA may still run).
  absl::Status Upload(void* device, const void* host, int64_t bytes, cudaStream_t stream);
  // Copies `bytes` from `device` to pageable `host` after the work queued on `stream`; returns
  // once every byte is in `host`.
  absl::Status Download(void* host, const void* device, int64_t bytes, cudaStream_t stream);

 private:
  static constexpr int kSlots = 2;
  PinnedStaging(int64_t slice_bytes, std::array<char*, kSlots> slots)
      : slice_bytes_(slice_bytes), slots_(slots) {}

  const int64_t slice_bytes_;
  std::array<char*, kSlots> slots_;
  std::array<Event, kSlots> done_;  // the slot's last DMA finished
};

}  // namespace anchorserve::cuda
