// The one place that decides which prefill engine serves a model.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/model.h"
#include "model/prefill_engine.h"

namespace anchorserve {

struct PrefillEngineOptions {
  bool use_cuda = false;  // the CUDA engine on `cuda_device`, else the CPU engine
  int cuda_device = 0;
  int cpu_threads = 0;  // 0 = all hardware threads
  // CUDA engine: token rows per MLP chunk (the bound of its [rows, 2I] intermediate); 0 = the
  // engine's default. Rounded up to a multiple of 128.
  int64_t mlp_chunk_rows = 0;
};

// FAILED_PRECONDITION when the CUDA engine is asked for in a build without CUDA or for a model
// whose attention the CUDA kernels do not serve.
absl::StatusOr<std::unique_ptr<PrefillEngine>> CreatePrefillEngine(
    const Model& model, const PrefillEngineOptions& options);

}  // namespace anchorserve
