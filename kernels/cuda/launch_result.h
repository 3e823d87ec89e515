// What the kernel launchers return. Plain C++ (no absl), so that the launchers stay
// framework-free; attention_runner.cc turns a result into an absl::Status.
#pragma once

#include <cuda_runtime_api.h>

namespace anchorserve::cuda {

// Success, a precondition the launcher checked that does not hold, or an error the CUDA runtime
// reported. `what` names the failed precondition (a string literal) and is null otherwise; its
// `code` is cudaErrorInvalidValue for an argument and cudaErrorInvalidDevice for the GPU.
struct [[nodiscard]] LaunchResult {
  cudaError_t code = cudaSuccess;
  const char* what = nullptr;

  static constexpr LaunchResult Ok() { return LaunchResult{}; }
  static constexpr LaunchResult InvalidArgument(const char* what) {
    return LaunchResult{cudaErrorInvalidValue, what};
  }
  static constexpr LaunchResult UnsupportedDevice(const char* what) {
    return LaunchResult{cudaErrorInvalidDevice, what};
  }
  // An error of a CUDA runtime call or launch (cudaSuccess: Ok()).
  static constexpr LaunchResult Cuda(cudaError_t error) { return LaunchResult{error, nullptr}; }

  constexpr bool ok() const { return code == cudaSuccess; }
  // A precondition failed (as opposed to CUDA reporting an error).
  constexpr bool precondition_failed() const { return what != nullptr; }
};

}  // namespace anchorserve::cuda
