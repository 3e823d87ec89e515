// Helpers shared by the GPU benchmark programs (anchor_kernel_bench, attention_microbench).
// Benchmarks are programs, not library code: a failed CUDA call ends the run with a message.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "kernels/cuda/launch_result.h"

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

// Exits with file:line, the expression and the failed precondition or CUDA error string when the
// kernel launcher call `expr` (a cuda::LaunchResult) did not succeed.
#define BENCH_LAUNCH(expr)                                                                        \
  do {                                                                                            \
    const ::anchorserve::cuda::LaunchResult bench_result_ = (expr);                               \
    if (!bench_result_.ok()) {                                                                    \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr,                          \
                   bench_result_.precondition_failed() ? bench_result_.what                       \
                                                       : cudaGetErrorString(bench_result_.code)); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (false)

// Median milliseconds, CUDA events on the default stream, of `enqueue` (which puts its work on
// that stream) over `reps` runs; warm-up is the caller's.
inline double MedianEventMs(const std::function<void()>& enqueue, int reps) {
  cudaEvent_t start, stop;
  BENCH_CUDA(cudaEventCreate(&start));
  BENCH_CUDA(cudaEventCreate(&stop));
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    BENCH_CUDA(cudaEventRecord(start));
    enqueue();
    BENCH_CUDA(cudaEventRecord(stop));
    BENCH_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  BENCH_CUDA(cudaEventDestroy(start));
  BENCH_CUDA(cudaEventDestroy(stop));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}
