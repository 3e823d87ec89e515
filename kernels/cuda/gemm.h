// Row-major "linear" products of the CUDA prefill engine on cuBLASLt (linked dynamically,
// libcublasLt.so): bf16 inputs, fp32 accumulation (CUBLAS_COMPUTE_32F; split-K partial sums,
// when the heuristic picks split-K, are kept in fp32 too), bf16 or fp32 output.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace anchorserve::cuda {

// out[m, n] = a[m, k] . w[n, k]^T (+ bias[n])
//   a: activations, row-major [m, k]; w: an [out, in] weight, row-major [n, k] (as Hugging Face
//   stores it); out row-major [m, n]. All device pointers of the runner's device, any alignment
//   (the plan is chosen for the alignment of the pointers it is called with).
//
// Plans (matmul descriptor, matrix layouts, the heuristic's algorithm) are cached per (m, n, k,
// bias, output type, pointer alignments), so repeated layers do not query the heuristic again.
// Calls are asynchronous on `stream`. All calls share one workspace: issue them on one stream (or
// order the streams yourself). Thread-safe (calls are serialized by a mutex).
class GemmRunner {
 public:
  static constexpr size_t kWorkspaceBytes = size_t{32} << 20;

  // Creates the cuBLASLt handle and the workspace on `device` (FAILED_PRECONDITION when there is
  // no such device).
  static absl::StatusOr<std::unique_ptr<GemmRunner>> Create(int device);
  ~GemmRunner();
  GemmRunner(const GemmRunner&) = delete;
  GemmRunner& operator=(const GemmRunner&) = delete;

  // bf16 out; bias (bf16 [n]) optional (nullptr), added in the epilogue (CUBLASLT_EPILOGUE_BIAS)
  // in fp32 before the rounding to bf16. Needs m >= 0, n >= 0, k >= 1 (m == 0 or n == 0: no-op).
  // INVALID_ARGUMENT for bad sizes or null pointers, INTERNAL (naming the shape and the cuBLAS
  // status) when cuBLASLt fails.
  absl::Status Linear(const uint16_t* a, int64_t m, int64_t k, const uint16_t* w, int64_t n,
                      const uint16_t* bias, uint16_t* out, cudaStream_t stream);

  // fp32 out (for the logits), no bias.
  absl::Status LinearF32(const uint16_t* a, int64_t m, int64_t k, const uint16_t* w, int64_t n,
                         float* out, cudaStream_t stream);

  int device() const;
  // Plans in the cache (a test hook: a second call with a cached shape adds none).
  int64_t CachedPlanCount() const;

 private:
  struct State;
  explicit GemmRunner(std::unique_ptr<State> state);
  absl::Status Run(const uint16_t* a, int64_t m, int64_t k, const uint16_t* w, int64_t n,
                   const uint16_t* bias, bool f32_out, void* out, cudaStream_t stream);

  std::unique_ptr<State> state_;
};

}  // namespace anchorserve::cuda
