// GPU reductions of anchor_kernel_bench: output recall and attention-mass recall of a sparse
// result against a dense one (the spec's definitions), without copying outputs to the host.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace anchorserve::bench {

struct DeviceRecall {
  int64_t elements = 0;
  int64_t within_0_01 = 0;   // |O - O_dense| < 0.01
  int64_t within_0_005 = 0;  // |O - O_dense| < 0.005
  int64_t rows = 0;
  double mass_sum = 0;  // sum over rows of exp(lse_sparse - lse_dense)
  float mass_min = 0;
};

// `sparse`/`dense`: `elements` bf16 values in the same packing; lse: `rows` floats each.
// Synchronous. Returns the first CUDA error.
cudaError_t ComputeDeviceRecall(const void* sparse, const void* dense, int64_t elements,
                                const float* lse_sparse, const float* lse_dense, int64_t rows,
                                DeviceRecall* recall);

}  // namespace anchorserve::bench
