// The prefill engine's elementwise and per-row kernels (layer_ops.h). Each op has a vectorized
// path (16-byte loads/stores) for aligned tensors whose rows are a multiple of the vector width
// and a scalar path for everything else; rows are spread over blocks with a grid-stride loop.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/layer_ops.h"
#include "kernels/dtype.h"

namespace anchorserve::cuda {

static_assert(static_cast<int>(DType::kBf16) == kLayerOpsBf16);
static_assert(static_cast<int>(DType::kFp16) == kLayerOpsFp16);
static_assert(static_cast<int>(DType::kFp32) == kLayerOpsFp32);

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Grid-stride loops cover anything beyond this many blocks.
constexpr int64_t kMaxBlocks = int64_t{1} << 16;
constexpr int kMaxRopeHeadDim = 4096;

bool Aligned(const void* pointer, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

unsigned RowBlocks(int64_t rows) {
  return static_cast<unsigned>(std::min<int64_t>(rows, kMaxBlocks));
}

unsigned FlatBlocks(int64_t items) {
  return static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks));
}

__device__ __forceinline__ float Bf16Bits(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// The low / high bf16 of a packed pair as fp32 (little-endian: element 0 is the low half).
__device__ __forceinline__ float LowBf16(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float HighBf16(uint32_t pair) {
  return __uint_as_float(pair & 0xffff0000u);
}

__device__ __forceinline__ uint16_t ToBf16(float value) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(value));
}

__device__ __forceinline__ uint32_t PackBf16(float low, float high) {
  return uint32_t{ToBf16(low)} | (uint32_t{ToBf16(high)} << 16);
}

__device__ __forceinline__ void Unpack8(const uint4& v, float out[8]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[2 * k] = LowBf16(words[k]);
    out[2 * k + 1] = HighBf16(words[k]);
  }
}

__device__ __forceinline__ float WarpSum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// ---------------------------------------------------------------------------------------------
// Embedding gather. kVec: h % 4 == 0, table 8-byte and x 16-byte aligned.

template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    EmbeddingGatherKernel(const int32_t* ids, int64_t n, const uint16_t* table, int h, float* x) {
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const uint16_t* src = table + int64_t{ids[t]} * h;
    float* dst = x + t * h;
    if constexpr (kVec) {
      const auto* src4 = reinterpret_cast<const uint2*>(src);
      auto* dst4 = reinterpret_cast<float4*>(dst);
      for (int j = threadIdx.x; j < h / 4; j += blockDim.x) {
        const uint2 v = src4[j];
        dst4[j] = make_float4(LowBf16(v.x), HighBf16(v.x), LowBf16(v.y), HighBf16(v.y));
      }
    } else {
      for (int j = threadIdx.x; j < h; j += blockDim.x) dst[j] = Bf16Bits(src[j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm, one block per row; with kAdd the residual add before it (x_out = x_in + add, then
// the norm of x_out), in one pass over x. kVec: h % 4 == 0, x 16-byte, add, w and y 8-byte
// aligned. The sums run in the same order either way, so the fused form gives the bits of the
// residual add followed by the norm.

template <bool kVec, bool kAdd>
__global__ void __launch_bounds__(kThreads)
    RmsNormKernel(const float* x_in, const uint16_t* add, float* x_out, int64_t n, int h,
                  const uint16_t* w, float eps, uint16_t* y) {
  __shared__ float warp_sums[kWarps];
  __shared__ float row_scale;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const float* row = x_in + t * h;
    uint16_t* out = y + t * h;
    float sum = 0.0f;
    if constexpr (kVec) {
      const auto* row4 = reinterpret_cast<const float4*>(row);
      for (int j = threadIdx.x; j < h / 4; j += blockDim.x) {
        float4 v = row4[j];
        if constexpr (kAdd) {
          const uint2 b = reinterpret_cast<const uint2*>(add + t * h)[j];
          v.x += LowBf16(b.x);
          v.y += HighBf16(b.x);
          v.z += LowBf16(b.y);
          v.w += HighBf16(b.y);
          reinterpret_cast<float4*>(x_out + t * h)[j] = v;
        }
        sum += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
      }
    } else {
      for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float v = row[j];
        if constexpr (kAdd) {
          v += Bf16Bits(add[t * h + j]);
          x_out[t * h + j] = v;
        }
        sum += v * v;
      }
    }
    sum = WarpSum(sum);
    if (lane == 0) warp_sums[warp] = sum;
    __syncthreads();
    if (warp == 0) {
      float total = lane < kWarps ? warp_sums[lane] : 0.0f;
      total = WarpSum(total);
      // IEEE division and square root (no --use_fast_math).
      if (lane == 0) row_scale = 1.0f / sqrtf(total / static_cast<float>(h) + eps);
    }
    __syncthreads();
    const float scale = row_scale;
    // With kAdd each thread reads back the elements it wrote itself.
    const float* normed_row = kAdd ? x_out + t * h : row;
    if constexpr (kVec) {
      const auto* row4 = reinterpret_cast<const float4*>(normed_row);
      const auto* w4 = reinterpret_cast<const uint2*>(w);
      auto* out4 = reinterpret_cast<uint2*>(out);
      for (int j = threadIdx.x; j < h / 4; j += blockDim.x) {
        const float4 v = row4[j];
        const uint2 wv = w4[j];
        // bf16(x * scale), then times the bf16 weight: exact in fp32, rounded to bf16 once.
        const float n0 = Bf16Bits(ToBf16(v.x * scale));
        const float n1 = Bf16Bits(ToBf16(v.y * scale));
        const float n2 = Bf16Bits(ToBf16(v.z * scale));
        const float n3 = Bf16Bits(ToBf16(v.w * scale));
        out4[j] = make_uint2(PackBf16(LowBf16(wv.x) * n0, HighBf16(wv.x) * n1),
                             PackBf16(LowBf16(wv.y) * n2, HighBf16(wv.y) * n3));
      }
    } else {
      for (int j = threadIdx.x; j < h; j += blockDim.x) {
        const float normed = Bf16Bits(ToBf16(normed_row[j] * scale));
        out[j] = ToBf16(Bf16Bits(w[j]) * normed);
      }
    }
    __syncthreads();  // row_scale and warp_sums are rewritten by the next row
  }
}

// ---------------------------------------------------------------------------------------------
// Rotate-half RoPE, one block per row; cos/sin of the row's angles in shared memory
// ([half] cos, then [half] sin). kVec2: half % 2 == 0, row_stride even, data 4-byte aligned.

__device__ __forceinline__ void RotatePair(float x1, float x2, float c, float s, float* y1,
                                           float* y2) {
  *y1 = x1 * c - x2 * s;
  *y2 = x2 * c + x1 * s;
}

template <bool kVec2>
__global__ void __launch_bounds__(kThreads)
    RopeKernel(uint16_t* data, int64_t n, int64_t row_stride, int num_heads, int head_dim,
               const float* inv_freq) {
  extern __shared__ float trig[];
  const int half = head_dim / 2;
  float* cos_table = trig;
  float* sin_table = trig + half;
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const float position = static_cast<float>(t);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      const float angle = position * inv_freq[i];
      cos_table[i] = cosf(angle);
      sin_table[i] = sinf(angle);
    }
    __syncthreads();
    uint16_t* row = data + t * row_stride;
    if constexpr (kVec2) {
      const int pairs = half / 2;
      for (int j = threadIdx.x; j < num_heads * pairs; j += blockDim.x) {
        const int head = j / pairs;
        const int i = (j - head * pairs) * 2;
        auto* p1 = reinterpret_cast<uint32_t*>(row + int64_t{head} * head_dim + i);
        auto* p2 = reinterpret_cast<uint32_t*>(row + int64_t{head} * head_dim + half + i);
        const uint32_t v1 = *p1;
        const uint32_t v2 = *p2;
        float a1, a2, b1, b2;
        RotatePair(LowBf16(v1), LowBf16(v2), cos_table[i], sin_table[i], &a1, &a2);
        RotatePair(HighBf16(v1), HighBf16(v2), cos_table[i + 1], sin_table[i + 1], &b1, &b2);
        *p1 = PackBf16(a1, b1);
        *p2 = PackBf16(a2, b2);
      }
    } else {
      for (int j = threadIdx.x; j < num_heads * half; j += blockDim.x) {
        const int head = j / half;
        const int i = j - head * half;
        uint16_t* p1 = row + int64_t{head} * head_dim + i;
        uint16_t* p2 = p1 + half;
        float y1, y2;
        RotatePair(Bf16Bits(*p1), Bf16Bits(*p2), cos_table[i], sin_table[i], &y1, &y2);
        *p1 = ToBf16(y1);
        *p2 = ToBf16(y2);
      }
    }
    __syncthreads();  // the tables are rewritten by the next row
  }
}

// ---------------------------------------------------------------------------------------------
// Residual add over the flat [n * h] tensors. kVec: x 16-byte and y 8-byte aligned (the tail
// after the last full vector is done element by element).

template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    ResidualAddKernel(float* x, const uint16_t* y, int64_t count) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  int64_t scalar_begin = 0;
  if constexpr (kVec) {
    auto* x4 = reinterpret_cast<float4*>(x);
    const auto* y4 = reinterpret_cast<const uint2*>(y);
    const int64_t vectors = count / 4;
    for (int64_t i = first; i < vectors; i += stride) {
      float4 a = x4[i];
      const uint2 b = y4[i];
      a.x += LowBf16(b.x);
      a.y += HighBf16(b.x);
      a.z += LowBf16(b.y);
      a.w += HighBf16(b.y);
      x4[i] = a;
    }
    scalar_begin = vectors * 4;
  }
  for (int64_t i = scalar_begin + first; i < count; i += stride) x[i] += Bf16Bits(y[i]);
}

// ---------------------------------------------------------------------------------------------
// SiLU(gate) * up, one block per row. kVec: inter % 8 == 0, gate_up and out 16-byte aligned.

__device__ __forceinline__ float SiluMul(float g, float u) {
  // IEEE expf and division (no --use_fast_math); g very negative gives -0.
  return g / (1.0f + expf(-g)) * u;
}

template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    SiluMulKernel(const uint16_t* gate_up, int64_t n, int inter, uint16_t* out) {
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const uint16_t* gate = gate_up + t * 2 * inter;
    const uint16_t* up = gate + inter;
    uint16_t* dst = out + t * inter;
    if constexpr (kVec) {
      const auto* gate8 = reinterpret_cast<const uint4*>(gate);
      const auto* up8 = reinterpret_cast<const uint4*>(up);
      auto* dst8 = reinterpret_cast<uint4*>(dst);
      for (int j = threadIdx.x; j < inter / 8; j += blockDim.x) {
        float g[8], u[8];
        Unpack8(gate8[j], g);
        Unpack8(up8[j], u);
        dst8[j] = make_uint4(PackBf16(SiluMul(g[0], u[0]), SiluMul(g[1], u[1])),
                             PackBf16(SiluMul(g[2], u[2]), SiluMul(g[3], u[3])),
                             PackBf16(SiluMul(g[4], u[4]), SiluMul(g[5], u[5])),
                             PackBf16(SiluMul(g[6], u[6]), SiluMul(g[7], u[7])));
      }
    } else {
      for (int j = threadIdx.x; j < inter; j += blockDim.x) {
        dst[j] = ToBf16(SiluMul(Bf16Bits(gate[j]), Bf16Bits(up[j])));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// K/V extraction, one block per source row. kVec: head_dim % 8 == 0, row_stride % 8 == 0, src
// and dst 16-byte aligned.

template <int kDtype>
struct KvOut;
template <>
struct KvOut<kLayerOpsBf16> {
  using T = uint16_t;
  __device__ static T From(uint32_t bits16) { return static_cast<T>(bits16); }
  __device__ static void Store8(T* dst, const uint32_t bits[8]) {
    *reinterpret_cast<uint4*>(dst) =
        make_uint4(bits[0] | (bits[1] << 16), bits[2] | (bits[3] << 16), bits[4] | (bits[5] << 16),
                   bits[6] | (bits[7] << 16));
  }
};
template <>
struct KvOut<kLayerOpsFp16> {
  using T = uint16_t;
  __device__ static T From(uint32_t bits16) {
    return __half_as_ushort(__float2half_rn(Bf16Bits(bits16)));
  }
  __device__ static void Store8(T* dst, const uint32_t bits[8]) {
    uint32_t h[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) h[k] = From(bits[k]);
    *reinterpret_cast<uint4*>(dst) = make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16),
                                                h[4] | (h[5] << 16), h[6] | (h[7] << 16));
  }
};
template <>
struct KvOut<kLayerOpsFp32> {
  using T = float;
  __device__ static T From(uint32_t bits16) { return Bf16Bits(bits16); }
  __device__ static void Store8(T* dst, const uint32_t bits[8]) {
    auto* dst4 = reinterpret_cast<float4*>(dst);
    dst4[0] = make_float4(From(bits[0]), From(bits[1]), From(bits[2]), From(bits[3]));
    dst4[1] = make_float4(From(bits[4]), From(bits[5]), From(bits[6]), From(bits[7]));
  }
};

template <int kDtype, bool kVec>
__global__ void __launch_bounds__(kThreads)
    ExtractKvKernel(const uint16_t* src, int64_t n, int64_t row_stride, int num_kv_heads,
                    int head_dim, bool head_major, void* dst_raw) {
  using Out = KvOut<kDtype>;
  auto* dst = static_cast<typename Out::T*>(dst_raw);
  constexpr int kWidth = kVec ? 8 : 1;
  const int chunks_per_head = head_dim / kWidth;
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const uint16_t* row = src + t * row_stride;
    for (int j = threadIdx.x; j < num_kv_heads * chunks_per_head; j += blockDim.x) {
      const int head = j / chunks_per_head;
      const int i = (j - head * chunks_per_head) * kWidth;
      const int64_t dst_offset = head_major ? (int64_t{head} * n + t) * head_dim + i
                                            : (t * num_kv_heads + head) * head_dim + i;
      const uint16_t* s = row + int64_t{head} * head_dim + i;
      if constexpr (kVec) {
        const uint4 v = *reinterpret_cast<const uint4*>(s);
        const uint32_t words[4] = {v.x, v.y, v.z, v.w};
        uint32_t bits[8];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          bits[2 * k] = words[k] & 0xffffu;
          bits[2 * k + 1] = words[k] >> 16;
        }
        Out::Store8(dst + dst_offset, bits);
      } else {
        dst[dst_offset] = Out::From(*s);
      }
    }
  }
}

template <int kDtype>
void LaunchExtractKvTyped(const uint16_t* src, int64_t n, int64_t row_stride, int num_kv_heads,
                          int head_dim, bool head_major, void* dst, cudaStream_t stream) {
  const bool vec = head_dim % 8 == 0 && row_stride % 8 == 0 && Aligned(src, 16) && Aligned(dst, 16);
  if (vec) {
    ExtractKvKernel<kDtype, true><<<RowBlocks(n), kThreads, 0, stream>>>(
        src, n, row_stride, num_kv_heads, head_dim, head_major, dst);
  } else {
    ExtractKvKernel<kDtype, false><<<RowBlocks(n), kThreads, 0, stream>>>(
        src, n, row_stride, num_kv_heads, head_dim, head_major, dst);
  }
}

// ---------------------------------------------------------------------------------------------
// fp32 -> bf16 over a flat array. kVec: src 16-byte and dst 8-byte aligned.

template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    FloatToBf16Kernel(const float* src, int64_t count, uint16_t* dst) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  int64_t scalar_begin = 0;
  if constexpr (kVec) {
    const auto* src4 = reinterpret_cast<const float4*>(src);
    auto* dst4 = reinterpret_cast<uint2*>(dst);
    const int64_t vectors = count / 4;
    for (int64_t i = first; i < vectors; i += stride) {
      const float4 v = src4[i];
      dst4[i] = make_uint2(PackBf16(v.x, v.y), PackBf16(v.z, v.w));
    }
    scalar_begin = vectors * 4;
  }
  for (int64_t i = scalar_begin + first; i < count; i += stride) dst[i] = ToBf16(src[i]);
}

}  // namespace

cudaError_t LaunchEmbeddingGather(const int32_t* ids, int64_t n, const uint16_t* table, int h,
                                  float* x, cudaStream_t stream) {
  if (n < 0 || h < 1) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (ids == nullptr || table == nullptr || x == nullptr) return cudaErrorInvalidValue;
  if (h % 4 == 0 && Aligned(table, 8) && Aligned(x, 16)) {
    EmbeddingGatherKernel<true><<<RowBlocks(n), kThreads, 0, stream>>>(ids, n, table, h, x);
  } else {
    EmbeddingGatherKernel<false><<<RowBlocks(n), kThreads, 0, stream>>>(ids, n, table, h, x);
  }
  return cudaGetLastError();
}

cudaError_t LaunchRmsNorm(const float* x, int64_t n, int h, const uint16_t* w, float eps,
                          uint16_t* y, cudaStream_t stream) {
  if (n < 0 || h < 1 || !(eps >= 0.0f) || std::isinf(eps)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (x == nullptr || w == nullptr || y == nullptr) return cudaErrorInvalidValue;
  if (h % 4 == 0 && Aligned(x, 16) && Aligned(w, 8) && Aligned(y, 8)) {
    RmsNormKernel<true, false>
        <<<RowBlocks(n), kThreads, 0, stream>>>(x, nullptr, nullptr, n, h, w, eps, y);
  } else {
    RmsNormKernel<false, false>
        <<<RowBlocks(n), kThreads, 0, stream>>>(x, nullptr, nullptr, n, h, w, eps, y);
  }
  return cudaGetLastError();
}

cudaError_t LaunchResidualAddRmsNorm(float* x, const uint16_t* add, int64_t n, int h,
                                     const uint16_t* w, float eps, uint16_t* y,
                                     cudaStream_t stream) {
  if (n < 0 || h < 1 || !(eps >= 0.0f) || std::isinf(eps)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (x == nullptr || add == nullptr || w == nullptr || y == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (h % 4 == 0 && Aligned(x, 16) && Aligned(add, 8) && Aligned(w, 8) && Aligned(y, 8)) {
    RmsNormKernel<true, true><<<RowBlocks(n), kThreads, 0, stream>>>(x, add, x, n, h, w, eps, y);
  } else {
    RmsNormKernel<false, true><<<RowBlocks(n), kThreads, 0, stream>>>(x, add, x, n, h, w, eps, y);
  }
  return cudaGetLastError();
}

cudaError_t LaunchRope(uint16_t* data, int64_t n, int64_t row_stride, int num_heads, int head_dim,
                       const float* inv_freq, cudaStream_t stream) {
  if (n < 0 || num_heads < 1 || head_dim < 2 || head_dim % 2 != 0 || head_dim > kMaxRopeHeadDim ||
      int64_t{num_heads} * head_dim > INT32_MAX || row_stride < int64_t{num_heads} * head_dim) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  if (data == nullptr || inv_freq == nullptr) return cudaErrorInvalidValue;
  const size_t shared_bytes = sizeof(float) * static_cast<size_t>(head_dim);
  if ((head_dim / 2) % 2 == 0 && row_stride % 2 == 0 && Aligned(data, 4)) {
    RopeKernel<true><<<RowBlocks(n), kThreads, shared_bytes, stream>>>(
        data, n, row_stride, num_heads, head_dim, inv_freq);
  } else {
    RopeKernel<false><<<RowBlocks(n), kThreads, shared_bytes, stream>>>(
        data, n, row_stride, num_heads, head_dim, inv_freq);
  }
  return cudaGetLastError();
}

cudaError_t LaunchResidualAdd(float* x, const uint16_t* y, int64_t n, int h, cudaStream_t stream) {
  if (n < 0 || h < 1) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (x == nullptr || y == nullptr) return cudaErrorInvalidValue;
  const int64_t count = n * h;
  if (Aligned(x, 16) && Aligned(y, 8)) {
    ResidualAddKernel<true><<<FlatBlocks(count / 4 + 1), kThreads, 0, stream>>>(x, y, count);
  } else {
    ResidualAddKernel<false><<<FlatBlocks(count), kThreads, 0, stream>>>(x, y, count);
  }
  return cudaGetLastError();
}

cudaError_t LaunchSiluMul(const uint16_t* gate_up, int64_t n, int inter, uint16_t* out,
                          cudaStream_t stream) {
  if (n < 0 || inter < 1) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (gate_up == nullptr || out == nullptr) return cudaErrorInvalidValue;
  if (inter % 8 == 0 && Aligned(gate_up, 16) && Aligned(out, 16)) {
    SiluMulKernel<true><<<RowBlocks(n), kThreads, 0, stream>>>(gate_up, n, inter, out);
  } else {
    SiluMulKernel<false><<<RowBlocks(n), kThreads, 0, stream>>>(gate_up, n, inter, out);
  }
  return cudaGetLastError();
}

cudaError_t LaunchExtractKv(const uint16_t* src, int64_t n, int64_t row_stride, int num_kv_heads,
                            int head_dim, int dst_dtype, bool head_major, void* dst,
                            cudaStream_t stream) {
  if (n < 0 || num_kv_heads < 1 || head_dim < 1 || int64_t{num_kv_heads} * head_dim > INT32_MAX ||
      row_stride < int64_t{num_kv_heads} * head_dim) {
    return cudaErrorInvalidValue;
  }
  if (dst_dtype != kLayerOpsBf16 && dst_dtype != kLayerOpsFp16 && dst_dtype != kLayerOpsFp32) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  if (src == nullptr || dst == nullptr) return cudaErrorInvalidValue;
  switch (dst_dtype) {
    case kLayerOpsBf16:
      LaunchExtractKvTyped<kLayerOpsBf16>(src, n, row_stride, num_kv_heads, head_dim, head_major,
                                          dst, stream);
      break;
    case kLayerOpsFp16:
      LaunchExtractKvTyped<kLayerOpsFp16>(src, n, row_stride, num_kv_heads, head_dim, head_major,
                                          dst, stream);
      break;
    default:
      LaunchExtractKvTyped<kLayerOpsFp32>(src, n, row_stride, num_kv_heads, head_dim, head_major,
                                          dst, stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t LaunchFloatToBf16(const float* src, int64_t count, uint16_t* dst, cudaStream_t stream) {
  if (count < 0) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  if (src == nullptr || dst == nullptr) return cudaErrorInvalidValue;
  if (Aligned(src, 16) && Aligned(dst, 8)) {
    FloatToBf16Kernel<true><<<FlatBlocks(count / 4 + 1), kThreads, 0, stream>>>(src, count, dst);
  } else {
    FloatToBf16Kernel<false><<<FlatBlocks(count), kThreads, 0, stream>>>(src, count, dst);
  }
  return cudaGetLastError();
}

}  // namespace anchorserve::cuda
