// Pooling, the end of the anchor stage (spec: docs/anchorattention.md): per pooling block r of a
// group, qbar_r (mean of the block's q rows) and abar_r (mean of their anchors x(i)) from the
// anchor kernels' per-tile fp64 sums, and qbar_r written as 2^e * qbar_r = hi + mid + lo in the
// input dtype, an exact split, for the stripe kernels (stripe_scoring.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/identification.h"
#include "kernels/cuda/identification_common.cuh"

namespace anchorserve::cuda {
namespace {

using id_detail::Elem;
using id_detail::kFullMask;

// Pooling. CTA = (batch group, pooled row r) x query head; one thread per dimension.
template <typename T, int kDim>
__global__ void __launch_bounds__(kDim) PoolKernel(const IdentificationParams p) {
  __shared__ float warp_max[kDim / 32];
  const int pooled_rows = p.pooled_rows;
  const int row = blockIdx.x % pooled_rows;
  const int64_t batch_group = blockIdx.x / pooled_rows;
  const int head = blockIdx.y;
  const int col = threadIdx.x;
  const int num_q_heads = p.num_q_heads;

  float qbar = 0.0f;
  float abar = INFINITY;  // blocks without rows never select anything
  if (row < p.geometry.step) {
    const IdBlock block = p.blocks[batch_group * p.geometry.step + row];
    if (block.rows > 0) {
      double qsum = 0.0;
      double xsum = 0.0;
      for (int t = block.first_tile; t < block.first_tile + block.num_tiles; ++t) {
        qsum += p.tile_qsum[(int64_t{t} * num_q_heads + head) * kDim + col];
        xsum += p.tile_xsum[int64_t{t} * num_q_heads + head];
      }
      qbar = static_cast<float>(qsum / block.rows);
      abar = static_cast<float>(xsum / block.rows);
    }
  }

  float magnitude = fabsf(qbar);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    magnitude = fmaxf(magnitude, __shfl_xor_sync(kFullMask, magnitude, offset));
  }
  if (col % 32 == 0) warp_max[col / 32] = magnitude;
  __syncthreads();
  magnitude = warp_max[0];
#pragma unroll
  for (int w = 1; w < kDim / 32; ++w) magnitude = fmaxf(magnitude, warp_max[w]);

  // 2^e * max|qbar| in [2^14, 2^15): every piece stays normal and finite in fp16 and bf16.
  int exponent = 0;
  if (magnitude > 0.0f && isfinite(magnitude)) {
    int binary_exponent;
    frexpf(magnitude, &binary_exponent);
    exponent = 15 - binary_exponent;
  }
  const float scaled = ldexpf(qbar, exponent);
  const T hi = Elem<T>::FromFloat(scaled);
  const float rest1 = scaled - Elem<T>::ToFloat(hi);  // exact
  const T mid = Elem<T>::FromFloat(rest1);
  const float rest2 = rest1 - Elem<T>::ToFloat(mid);  // exact
  const T lo = Elem<T>::FromFloat(rest2);

  const int64_t pooled_row = (batch_group * num_q_heads + head) * pooled_rows + row;
  T* split = static_cast<T*>(p.pooled_split) + pooled_row * 3 * kDim;
  split[col] = hi;
  split[kDim + col] = mid;
  split[2 * kDim + col] = lo;
  if (col == 0) {
    p.pooled_unscale[pooled_row] = ldexpf(1.0f, -exponent);
    p.pooled_anchor[pooled_row] = abar;
  }
}

template <typename T, int kDim>
cudaError_t LaunchPool(const IdentificationParams& p, cudaStream_t stream) {
  if (p.num_groups == 0) return cudaSuccess;
  const dim3 grid(p.num_groups * p.pooled_rows, p.num_q_heads);
  PoolKernel<T, kDim><<<grid, kDim, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

LaunchResult LaunchPooling(const IdentificationParams& p, cudaStream_t stream) {
  const LaunchResult shape = id_detail::CheckShape(p);
  if (!shape.ok()) return shape;
  const bool bf16 = p.elem_type == ElemType::kBf16;
  cudaError_t error;
  if (p.head_dim == 128) {
    error = bf16 ? LaunchPool<__nv_bfloat16, 128>(p, stream) : LaunchPool<__half, 128>(p, stream);
  } else {
    error = bf16 ? LaunchPool<__nv_bfloat16, 64>(p, stream) : LaunchPool<__half, 64>(p, stream);
  }
  return LaunchResult::Cuda(error);
}

}  // namespace anchorserve::cuda
