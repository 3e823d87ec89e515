#include <string>

#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"
#if ANCHOR_ENABLE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace anchorserve {

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateBackend(const BackendOptions& options) {
  switch (options.kind) {
    case BackendKind::kCpu:
      return CreateCpuBackend(options.cpu_threads);
    case BackendKind::kCuda:
#if ANCHOR_ENABLE_CUDA
      return CreateCudaBackend(options.cuda_device);
#else
      return absl::FailedPreconditionError(
          "backend 'cuda' requested but this build has no CUDA (configure with "
          "-DANCHOR_ENABLE_CUDA=ON)");
#endif
    case BackendKind::kAuto:
#if ANCHOR_ENABLE_CUDA
      if (CudaDeviceCount() > 0) {
        absl::StatusOr<std::unique_ptr<AttentionBackend>> cuda =
            CreateCudaBackend(options.cuda_device);
        // A GPU the kernels cannot run on (not sm_90) is no reason to refuse service.
        if (cuda.ok() || cuda.status().code() != absl::StatusCode::kFailedPrecondition) {
          return cuda;
        }
        if (options.maybe_fallback_reason != nullptr) {
          *options.maybe_fallback_reason = std::string(cuda.status().message());
        }
      }
#endif
      return CreateCpuBackend(options.cpu_threads);
  }
  return absl::InvalidArgumentError("unknown backend kind");
}

}  // namespace anchorserve
