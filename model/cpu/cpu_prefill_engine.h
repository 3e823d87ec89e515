// The CPU PrefillEngine: fp32 forward pass of a loaded Model, layer by layer over the whole
// prompt (only one layer's activations are alive), GEMMs through BLIS (CBLAS), attention through
// the CPU AttentionBackend.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "model/model.h"
#include "model/prefill_engine.h"

namespace anchorserve {

// Rows of the MLP processed at once: bounds its [rows, intermediate] gate/up buffers to about
// kMlpChunkFloats floats each, but never below kMinMlpChunkRows rows (GEMM efficiency).
inline constexpr int64_t kMlpChunkFloats = int64_t{8} << 20;
inline constexpr int64_t kMinMlpChunkRows = 64;

struct CpuPrefillOptions {
  int threads = 0;  // 0 = all hardware threads
  // Fill every workspace buffer with NaN bytes before use, so that a value the engine fails to
  // write shows up in its outputs (for tests; costs one pass over the workspace per Run).
  bool poison_workspace = false;
};

// `model` must outlive the engine. `threads` workers for the elementwise work, the attention
// backend and BLIS (0 = all hardware threads; negative is INVALID_ARGUMENT). BLIS's
// thread count is process-wide: the engine sets it at creation and before every Run.
// Runs are serialized: a concurrent Run waits for the one in progress.
absl::StatusOr<std::unique_ptr<PrefillEngine>> CreateCpuPrefillEngine(const Model& model,
                                                                      int threads);
absl::StatusOr<std::unique_ptr<PrefillEngine>> CreateCpuPrefillEngine(
    const Model& model, const CpuPrefillOptions& options);

}  // namespace anchorserve
