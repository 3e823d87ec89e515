// Elementwise and per-row kernels of the CUDA prefill engine (one transformer layer of Llama /
// Qwen2 around the GEMMs and the attention): embedding gather, RMSNorm, rotary embedding,
// residual add (alone or fused with the RMSNorm that follows it), SiLU-and-multiply, K/V
// extraction and fp32 -> bf16 conversion.
//
// Plain C++: bf16 tensors are passed as their bit patterns (uint16_t), so that host code needs no
// cuda_bf16.h. Every launcher is asynchronous on `stream` (no synchronisation) and returns the
// launch's cudaError_t: cudaErrorInvalidValue for bad sizes, a null pointer where there is work,
// or an unknown dtype (checked before anything is launched), otherwise cudaGetLastError() after
// the launch. An empty problem (n == 0 or count == 0) launches nothing and returns cudaSuccess.
// Pointers are device pointers of the current device; any alignment works (16-byte aligned
// tensors with rows a multiple of 8 elements take the vectorized paths).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace anchorserve::cuda {

// Element type codes of ExtractKv's destination (the values of anchorserve::DType in
// kernels/dtype.h).
inline constexpr int kLayerOpsBf16 = 0;
inline constexpr int kLayerOpsFp16 = 1;
inline constexpr int kLayerOpsFp32 = 2;

// x[n, h] (fp32) = table[ids[t], :] (bf16) for t < n. ids must lie in [0, vocab) of the table
// (not checked on the device). Needs n >= 0, h >= 1.
cudaError_t LaunchEmbeddingGather(const int32_t* ids, int64_t n, const uint16_t* table, int h,
                                  float* x, cudaStream_t stream);

// y[t, :] = bf16(w * bf16(x[t, :] * rsqrt(mean(x[t, :]^2) + eps)))   x fp32 [n, h], w bf16 [h],
// y bf16 [n, h]: transformers' order (normalize in fp32, cast to bf16, multiply by the bf16
// weight); the product is exact in fp32 and rounded to bf16 once. Needs n >= 0, h >= 1,
// eps >= 0.
cudaError_t LaunchRmsNorm(const float* x, int64_t n, int h, const uint16_t* w, float eps,
                          uint16_t* y, cudaStream_t stream);

// Rotate-half RoPE in place on heads [0, num_heads) of rows t = 0..n-1 of a bf16 buffer: element
// (t, head, i) at data[t * row_stride + head * head_dim + i]. For i < d/2:
//   angle = float(t) * inv_freq[i] (fp32), c = cosf(angle), s = sinf(angle) (IEEE, no intrinsics),
//   (x1, x2) = (x[i], x[i + d/2]); x[i] = x1*c - x2*s; x[i + d/2] = x2*c + x1*s,
// computed in fp32 and rounded to bf16 once. inv_freq: device fp32 [head_dim / 2].
// Needs n >= 0, num_heads >= 1, head_dim even in [2, 4096], num_heads * head_dim < 2^31,
// row_stride >= num_heads * head_dim.
cudaError_t LaunchRope(uint16_t* data, int64_t n, int64_t row_stride, int num_heads, int head_dim,
                       const float* inv_freq, cudaStream_t stream);

// x[t, :] += y[t, :]   x fp32 [n, h], y bf16 [n, h] (fp32 add). Needs n >= 0, h >= 1.
cudaError_t LaunchResidualAdd(float* x, const uint16_t* y, int64_t n, int h, cudaStream_t stream);

// LaunchResidualAdd(x, add) then LaunchRmsNorm(x, w -> y) in one pass over x, with the same bits:
// x[t, :] += add[t, :], then y[t, :] as LaunchRmsNorm of the new x[t, :]. add bf16 [n, h].
// Needs n >= 0, h >= 1, eps >= 0.
cudaError_t LaunchResidualAddRmsNorm(float* x, const uint16_t* add, int64_t n, int h,
                                     const uint16_t* w, float eps, uint16_t* y,
                                     cudaStream_t stream);

// out[t, j] = bf16(silu(g) * u), g = gate_up[t, j], u = gate_up[t, inter + j],
// silu(g) = g / (1 + expf(-g)) in fp32; gate_up bf16 [n, 2*inter], out bf16 [n, inter].
// Needs n >= 0, inter >= 1.
cudaError_t LaunchSiluMul(const uint16_t* gate_up, int64_t n, int inter, uint16_t* out,
                          cudaStream_t stream);

// One K or V tensor of a layer out of the fused projection buffer: src element (t, head, i) at
// src[t * row_stride + head * head_dim + i] (bf16); dst contiguous of dtype `dst_dtype`
// (kLayerOpsBf16 / kLayerOpsFp16 / kLayerOpsFp32; fp16 rounds to nearest even, overflow to inf),
// head_major ? [num_kv_heads, n, head_dim] : [n, num_kv_heads, head_dim].
// Needs n >= 0, num_kv_heads >= 1, head_dim >= 1, num_kv_heads * head_dim < 2^31,
// row_stride >= num_kv_heads * head_dim.
cudaError_t LaunchExtractKv(const uint16_t* src, int64_t n, int64_t row_stride, int num_kv_heads,
                            int head_dim, int dst_dtype, bool head_major, void* dst,
                            cudaStream_t stream);

// dst[i] = bf16(src[i]) for i < count, round to nearest even (NaN stays NaN, overflow to inf):
// fp32 weights uploaded as fp32 converted on the device. Needs count >= 0.
cudaError_t LaunchFloatToBf16(const float* src, int64_t count, uint16_t* dst, cudaStream_t stream);

}  // namespace anchorserve::cuda
