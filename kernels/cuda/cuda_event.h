// A CUDA event owned by its holder, and the time between two of them.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "kernels/cuda/cuda_check.h"

namespace anchorserve::cuda {

class Event {
 public:
  Event() = default;
  ~Event() {
    if (event_ != nullptr) cudaEventDestroy(event_);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  // Creates the event now (a stream may wait on it before it is ever recorded: a no-op then).
  absl::Status Create() {
    if (event_ == nullptr) ANCHOR_CUDA_RETURN_IF_ERROR(cudaEventCreate(&event_));
    return absl::OkStatus();
  }
  // Creates the event when needed and records it on `stream`.
  absl::Status Record(cudaStream_t stream) {
    if (absl::Status created = Create(); !created.ok()) return created;
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaEventRecord(event_, stream));
    return absl::OkStatus();
  }
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

// Seconds between two completed events; 0 when either was never recorded.
inline double SecondsBetween(const Event& from, const Event& to) {
  float ms = 0.0f;
  if (from.get() == nullptr || to.get() == nullptr ||
      cudaEventElapsedTime(&ms, from.get(), to.get()) != cudaSuccess) {
    cudaGetLastError();
    return 0.0;
  }
  return ms * 1e-3;
}

}  // namespace anchorserve::cuda
