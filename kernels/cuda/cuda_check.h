// CUDA error checks for host code that returns absl::Status.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/backend.h"

namespace anchorserve::cuda {

// Errors after which the CUDA context is unusable until the process exits.
inline bool IsStickyCudaError(cudaError_t error) {
  switch (error) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorECCUncorrectable:
    case cudaErrorAssert:
    case cudaErrorNvlinkUncorrectable:
      return true;
    default:
      return false;
  }
}

inline absl::Status CudaErrorToStatus(cudaError_t error, const char* expression, const char* file,
                                      int line) {
  if (IsStickyCudaError(error)) {
    return DeviceUnusableError(
        absl::StrCat(file, ":", line, ": ", expression, ": ", cudaGetErrorName(error), ": ",
                     cudaGetErrorString(error), " (the device is unusable until restart)"));
  }
  return absl::InternalError(absl::StrCat(file, ":", line, ": ", expression, ": ",
                                          cudaGetErrorName(error), ": ",
                                          cudaGetErrorString(error)));
}

}  // namespace anchorserve::cuda

// Evaluates `expr` (a cudaError_t) and returns absl::InternalError with file:line and the CUDA
// error string from the enclosing function when it is not cudaSuccess.
#define ANCHOR_CUDA_RETURN_IF_ERROR(expr)                                                \
  do {                                                                                   \
    const cudaError_t anchor_cuda_error_ = (expr);                                       \
    if (anchor_cuda_error_ != cudaSuccess) {                                             \
      return ::anchorserve::cuda::CudaErrorToStatus(anchor_cuda_error_, #expr, __FILE__, \
                                                    __LINE__);                           \
    }                                                                                    \
  } while (false)
