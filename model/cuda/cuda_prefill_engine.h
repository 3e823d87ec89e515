// The CUDA prefill engine: the whole forward pass of a Llama/Qwen2-family model on one GPU.
//
// Weights are uploaded once in bf16 (q separately, k|v and gate|up fused along the output dim;
// Qwen2's q/k/v biases in the GEMM epilogue). Layer-major over the whole prompt: the residual
// stream stays in fp32 on the device, the GEMMs run on cuBLASLt (bf16 in, fp32 accumulate), the
// elementwise work in fused kernels (kernels/cuda/layer_ops.h), attention through
// AttentionRunner::RunOnDevice on views of the projection outputs (no copies of Q/K/V). The MLP
// runs over row chunks to bound its intermediate. Each finished layer's K/V is converted on the
// device, copied on a second stream into a pinned two-slot ring and handed to the sink while
// the next layer computes.
//
// Device memory is allocated per run from WorkspaceBytes and returned afterwards, so a prompt
// that does not fit fails before any layer runs (RESOURCE_EXHAUSTED), and an idle engine holds
// only its weights on the device. The pinned host ring stays allocated between runs while it is
// at most 4 GiB (all four slots; Llama-3.1-8B's at 128k tokens is 1 GiB in bf16, 2 GiB in fp32):
// page-locking it again costs time in proportion to the prompt; a larger one is freed after its
// run.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "model/model.h"
#include "model/prefill_engine.h"

namespace anchorserve {

// `model` must outlive the engine. FAILED_PRECONDITION when the model's head_dim is not one the
// CUDA attention serves (64, 128) or no such device exists. mlp_chunk_rows: token rows per MLP
// chunk, rounded up to a multiple of 128; 0 = the engine's default (an intermediate of
// about 256 MiB).
absl::StatusOr<std::unique_ptr<PrefillEngine>> CreateCudaPrefillEngine(const Model& model,
                                                                       int device,
                                                                       int64_t mlp_chunk_rows = 0);

}  // namespace anchorserve
