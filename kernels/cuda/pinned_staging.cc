#include "kernels/cuda/pinned_staging.h"

#include <algorithm>
#include <cstring>
#include <iterator>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/status_macros.h"

namespace anchorserve::cuda {

PinnedHostRanges::~PinnedHostRanges() {
  absl::MutexLock lock(&mu_);
  for (const auto& [start, bytes] : ranges_) cudaHostUnregister(reinterpret_cast<void*>(start));
}

bool PinnedHostRanges::Pin(void* data, size_t bytes) {
  // Registration belongs to a device's context; the caller's thread may not have one current.
  if (cudaSetDevice(device_) != cudaSuccess ||
      cudaHostRegister(data, bytes, cudaHostRegisterDefault) != cudaSuccess) {
    cudaGetLastError();  // not sticky: the range stays pageable and is staged
    return false;
  }
  absl::MutexLock lock(&mu_);
  ranges_[reinterpret_cast<uintptr_t>(data)] = bytes;
  pinned_bytes_ += static_cast<int64_t>(bytes);
  return true;
}

void PinnedHostRanges::Unpin(void* data) {
  {
    absl::MutexLock lock(&mu_);
    auto found = ranges_.find(reinterpret_cast<uintptr_t>(data));
    if (found == ranges_.end()) return;
    pinned_bytes_ -= static_cast<int64_t>(found->second);
    ranges_.erase(found);
  }
  if (cudaSetDevice(device_) != cudaSuccess || cudaHostUnregister(data) != cudaSuccess) {
    cudaGetLastError();
  }
}

bool PinnedHostRanges::Contains(const void* data, int64_t bytes) const {
  const uintptr_t start = reinterpret_cast<uintptr_t>(data);
  absl::MutexLock lock(&mu_);
  auto after = ranges_.upper_bound(start);
  if (after == ranges_.begin()) return false;
  const auto& [range_start, range_bytes] = *std::prev(after);
  return start + static_cast<uintptr_t>(bytes) <= range_start + range_bytes;
}

int64_t PinnedHostRanges::pinned_bytes() const {
  absl::MutexLock lock(&mu_);
  return pinned_bytes_;
}

absl::StatusOr<std::unique_ptr<PinnedStaging>> PinnedStaging::Create(
    int64_t slice_bytes, const PinnedHostRanges* pinned) {
  std::array<char*, kSlots> slots{};
  for (char*& slot : slots) {
    void* memory = nullptr;
    const cudaError_t error =
        cudaHostAlloc(&memory, static_cast<size_t>(slice_bytes), cudaHostAllocDefault);
    if (error != cudaSuccess) {
      cudaGetLastError();
      for (char* allocated : slots) {
        if (allocated != nullptr) cudaFreeHost(allocated);
      }
      return absl::ResourceExhaustedError(absl::StrCat("pinned staging buffer of ", slice_bytes,
                                                       " bytes: ", cudaGetErrorString(error)));
    }
    slot = static_cast<char*>(memory);
  }
  auto staging = std::unique_ptr<PinnedStaging>(new PinnedStaging(slice_bytes, slots, pinned));
  for (Event& event : staging->done_) ANCHOR_RETURN_IF_ERROR(event.Create());
  return staging;
}

PinnedStaging::~PinnedStaging() {
  for (Event& event : done_) cudaEventSynchronize(event.get());
  for (char* slot : slots_) cudaFreeHost(slot);
}

absl::Status PinnedStaging::Upload(void* device, const void* host, int64_t bytes,
                                   cudaStream_t stream) {
  if (IsPinned(host, bytes)) {
    ANCHOR_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(device, host, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, stream));
    return absl::OkStatus();
  }
  int slot = 0;
  for (int64_t offset = 0; offset < bytes; offset += slice_bytes_, slot = (slot + 1) % kSlots) {
    const int64_t n = std::min(slice_bytes_, bytes - offset);
    // The slot's previous slice has left it.
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(done_[slot].get()));
    std::memcpy(slots_[slot], static_cast<const char*>(host) + offset, static_cast<size_t>(n));
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(static_cast<char*>(device) + offset, slots_[slot],
                                                static_cast<size_t>(n), cudaMemcpyHostToDevice,
                                                stream));
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaEventRecord(done_[slot].get(), stream));
  }
  return absl::OkStatus();
}

absl::Status PinnedStaging::Download(void* host, const void* device, int64_t bytes,
                                     cudaStream_t stream) {
  if (IsPinned(host, bytes)) {
    ANCHOR_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(host, device, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost, stream));
    return absl::OkStatus();
  }
  const int64_t slices = (bytes + slice_bytes_ - 1) / slice_bytes_;
  auto enqueue = [&](int64_t index) -> absl::Status {
    const int slot = static_cast<int>(index % kSlots);
    const int64_t offset = index * slice_bytes_;
    const int64_t n = std::min(slice_bytes_, bytes - offset);
    ANCHOR_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(slots_[slot], static_cast<const char*>(device) + offset,
                        static_cast<size_t>(n), cudaMemcpyDeviceToHost, stream));
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaEventRecord(done_[slot].get(), stream));
    return absl::OkStatus();
  };
  // Slice i+1 is in flight while slice i is copied out of its slot.
  if (slices > 0) ANCHOR_RETURN_IF_ERROR(enqueue(0));
  for (int64_t index = 0; index < slices; ++index) {
    if (index + 1 < slices) ANCHOR_RETURN_IF_ERROR(enqueue(index + 1));
    const int slot = static_cast<int>(index % kSlots);
    const int64_t offset = index * slice_bytes_;
    const int64_t n = std::min(slice_bytes_, bytes - offset);
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(done_[slot].get()));
    std::memcpy(static_cast<char*>(host) + offset, slots_[slot], static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

}  // namespace anchorserve::cuda
