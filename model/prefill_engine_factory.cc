#include "model/prefill_engine_factory.h"

#include "model/cpu/cpu_prefill_engine.h"
#if ANCHOR_ENABLE_CUDA
#include "model/cuda/cuda_prefill_engine.h"
#endif

namespace anchorserve {

absl::StatusOr<std::unique_ptr<PrefillEngine>> CreatePrefillEngine(
    const Model& model, const PrefillEngineOptions& options) {
  if (!options.use_cuda) return CreateCpuPrefillEngine(model, options.cpu_threads);
#if ANCHOR_ENABLE_CUDA
  return CreateCudaPrefillEngine(model, options.cuda_device, options.mlp_chunk_rows);
#else
  return absl::FailedPreconditionError(
      "the cuda prefill engine was asked for but this build has no CUDA");
#endif
}

}  // namespace anchorserve
