#include <cuda_bf16.h>

#include <cmath>
#include <cstring>

#include "bench/gpu/bench_recall.h"

namespace anchorserve::bench {
namespace {

struct Accumulators {
  unsigned long long within_0_01;
  unsigned long long within_0_005;
  double mass_sum;
  unsigned int mass_min_bits;  // a non-negative float's bits order like the float
};

__global__ void OutputRecallKernel(const __nv_bfloat16* sparse, const __nv_bfloat16* dense,
                                   int64_t elements, Accumulators* acc) {
  unsigned long long tight = 0, loose = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < elements;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float diff = fabsf(__bfloat162float(sparse[i]) - __bfloat162float(dense[i]));
    loose += diff < 0.01f;  // NaN counts as a miss
    tight += diff < 0.005f;
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    loose += __shfl_xor_sync(0xffffffffu, loose, offset);
    tight += __shfl_xor_sync(0xffffffffu, tight, offset);
  }
  if (threadIdx.x % 32 == 0) {
    atomicAdd(&acc->within_0_01, loose);
    atomicAdd(&acc->within_0_005, tight);
  }
}

__global__ void MassRecallKernel(const float* lse_sparse, const float* lse_dense, int64_t rows,
                                 Accumulators* acc) {
  double sum = 0;
  float minimum = INFINITY;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < rows;
       i += int64_t{gridDim.x} * blockDim.x) {
    const double mass = exp(static_cast<double>(lse_sparse[i]) - lse_dense[i]);
    sum += mass;
    minimum = fminf(minimum, static_cast<float>(mass));
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    minimum = fminf(minimum, __shfl_xor_sync(0xffffffffu, minimum, offset));
  }
  if (threadIdx.x % 32 == 0) {
    atomicAdd(&acc->mass_sum, sum);
    atomicMin(&acc->mass_min_bits, __float_as_uint(fmaxf(minimum, 0.0f)));
  }
}

}  // namespace

cudaError_t ComputeDeviceRecall(const void* sparse, const void* dense, int64_t elements,
                                const float* lse_sparse, const float* lse_dense, int64_t rows,
                                DeviceRecall* recall) {
  Accumulators* acc = nullptr;
  cudaError_t error = cudaMalloc(&acc, sizeof(Accumulators));
  if (error != cudaSuccess) return error;
  const float infinity = INFINITY;
  unsigned int infinity_bits;
  std::memcpy(&infinity_bits, &infinity, sizeof(infinity_bits));
  Accumulators init{0, 0, 0.0, infinity_bits};
  error = cudaMemcpy(acc, &init, sizeof(init), cudaMemcpyHostToDevice);
  if (error == cudaSuccess) {
    OutputRecallKernel<<<1024, 256>>>(static_cast<const __nv_bfloat16*>(sparse),
                                      static_cast<const __nv_bfloat16*>(dense), elements, acc);
    error = cudaGetLastError();
  }
  if (error == cudaSuccess) {
    MassRecallKernel<<<256, 256>>>(lse_sparse, lse_dense, rows, acc);
    error = cudaGetLastError();
  }
  Accumulators result{};
  if (error == cudaSuccess) {
    error = cudaMemcpy(&result, acc, sizeof(result), cudaMemcpyDeviceToHost);
  }
  cudaFree(acc);
  if (error != cudaSuccess) return error;
  recall->elements = elements;
  recall->within_0_01 = static_cast<int64_t>(result.within_0_01);
  recall->within_0_005 = static_cast<int64_t>(result.within_0_005);
  recall->rows = rows;
  recall->mass_sum = result.mass_sum;
  unsigned int bits = result.mass_min_bits;
  float minimum;
  std::memcpy(&minimum, &bits, sizeof(minimum));
  recall->mass_min = minimum;
  return cudaSuccess;
}

}  // namespace anchorserve::bench
