// The CPU AttentionBackend: fp32 accumulation on any x86-64 (AVX-512 / AVX2+FMA inner kernels
// picked at run time, portable fallback), bf16/fp16/fp32 inputs in either layout, any seq_len,
// GQA, head_dim 1..256.
#pragma once

#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace anchorserve {

// `threads` workers (0 = std::thread::hardware_concurrency()). INVALID_ARGUMENT when negative.
absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCpuBackend(int threads);

// The same with the inner kernels forced to one variant ("avx512", "avx2" or "portable") instead
// of the fastest this CPU runs; INVALID_ARGUMENT when the CPU cannot run it. For benchmarks.
absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCpuBackendWithKernels(
    int threads, std::string_view kernels);

}  // namespace anchorserve
