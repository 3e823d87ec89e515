// Helpers shared by the GPU benchmark programs (anchor_kernel_bench, attention_microbench).
// Benchmarks are programs, not library code: a failed CUDA call ends the run with a message.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>

// Exits with file:line, the expression and the CUDA error string when `expr` is not cudaSuccess.
#define BENCH_CUDA(expr)                                                 \
  do {                                                                   \
    const cudaError_t bench_error_ = (expr);                             \
    if (bench_error_ != cudaSuccess) {                                   \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, \
                   cudaGetErrorString(bench_error_));                    \
      std::exit(1);                                                      \
    }                                                                    \
  } while (false)
