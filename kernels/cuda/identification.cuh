// Device helpers of the identification kernels: element traits, mma.sync m16n8k16 with fp32
// accumulation, the XOR swizzle of [rows, d] tiles in shared memory, and the 128-byte-swizzle
// shared-memory descriptors of the wgmma kernels (the PTX wrappers themselves, cp.async,
// ldmatrix and wgmma among them, are in ptx.cuh). Also declares the launchers of the wgmma
// kernels (identification_wgmma.cu) for identification.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/identification_types.h"
#include "kernels/cuda/ptx.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ANCHOR_ID_HAS_WGMMA 1
#else
#define ANCHOR_ID_HAS_WGMMA 0
#endif

namespace anchorserve::cuda::id_detail {

template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 FromFloat(float x) {
    return __float2bfloat16_rn(x);
  }
  // c += a * b: a [16 x 16] row-major fragment, b [16 x 8] column fragment, fp32 accumulators.
  static __device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half FromFloat(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// 16-byte chunk index of (row, chunk) in a [rows, kChunks] tile whose chunks are XOR-swizzled by
// row % 8, so that the 8 rows an ldmatrix reads at one logical chunk hit 8 different bank groups.
template <int kChunks>
__device__ __forceinline__ int SwizzledChunk(int row, int chunk) {
  static_assert(kChunks % 8 == 0, "rows must be a multiple of 8 chunks (64 elements)");
  return row * kChunks + (chunk ^ (row & 7));
}

// ---------------------------------------------------------------------------------------------
// wgmma (sm_90a). Shared-memory operands are K-major tiles of [rows][64-element panel] with
// 128-byte rows whose eight 16-byte chunks are XOR-swizzled by row % 8 (the canonical 128B
// swizzle; tile bases aligned to 1024 bytes). Byte offset of (row, 16-byte chunk c) in a tile of
// `rows` rows: (c / 8) * rows * 128 + row * 128 + ((c % 8) ^ (row % 8)) * 16.
__device__ __forceinline__ uint32_t SwizzledOffset128(int rows, int row, int chunk) {
  return static_cast<uint32_t>((chunk / 8) * rows * 128 + row * 128 +
                               (((chunk % 8) ^ (row % 8)) << 4));
}

// Descriptor of a K-major operand in that layout: 8-row core groups 1024 bytes apart, 128B swizzle
// (the leading offset is unused for swizzled K-major operands).
__device__ __forceinline__ uint64_t SmemDescriptor128(uint32_t address) {
  return ptx::MakeSmemDescriptor(address, /*leading_bytes=*/16, /*stride_bytes=*/1024);
}

// S[64 x 128] (+)= A (smem) * B^T (smem); accumulate = 0 overwrites S.
template <typename T>
__device__ __forceinline__ void WgmmaSs(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                        int accumulate) {
#if ANCHOR_ID_HAS_WGMMA
  ptx::WgmmaSsN128<T>(d, desc_a, desc_b, accumulate);
#endif
}

// S[64 x 128] (+)= A (registers) * B^T (smem).
template <typename T>
__device__ __forceinline__ void WgmmaRs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                        int accumulate) {
#if ANCHOR_ID_HAS_WGMMA
  ptx::WgmmaRsN128<T>(d, a, desc_b, accumulate);
#endif
}

// First key of the local part of the anchor region of group `group`:
// max(n_init * G, (g - n_loc + 1) * G), never below 0.
__host__ __device__ __forceinline__ int64_t LocalRegionBegin(const AnchorGeometry& geometry,
                                                             int64_t group) {
  const int64_t group_size = geometry.group_size;
  const int64_t init_end = int64_t{geometry.init_groups} * group_size;
  int64_t local_begin = (group - geometry.local_groups + 1) * group_size;
  local_begin = local_begin > init_end ? local_begin : init_end;
  return local_begin > 0 ? local_begin : 0;
}

// A(i) of a query tile whose rows end at `row_end`, as tiles of kKeyTile keys: `init_tiles` tiles
// over [0, init_hi), then tiles over [local_lo, i] from local_lo rounded down to a tile. Every
// anchor kernel walks its keys this way.
template <int kKeyTile>
struct AnchorKeyTiles {
  int init_hi;        // end of the initial part, cut at row_end
  int local_lo;       // start of the local part, cut at row_end
  int row_end;        // one past the tile's last row
  int init_tiles;     // tiles of the initial part
  int local_aligned;  // local_lo rounded down to kKeyTile
  int num_tiles;

  __device__ __forceinline__ AnchorKeyTiles(const AnchorGeometry& geometry, int group,
                                            int tile_row_end) {
    const int64_t init_end = int64_t{geometry.init_groups} * geometry.group_size;
    const int64_t local_begin = LocalRegionBegin(geometry, group);
    row_end = tile_row_end;
    init_hi = static_cast<int>(init_end < row_end ? init_end : row_end);
    local_lo = static_cast<int>(local_begin < row_end ? local_begin : row_end);
    init_tiles = (init_hi + kKeyTile - 1) / kKeyTile;
    local_aligned = local_lo / kKeyTile * kKeyTile;
    const int local_tiles =
        row_end > local_lo ? (row_end - local_aligned + kKeyTile - 1) / kKeyTile : 0;
    num_tiles = init_tiles + local_tiles;
  }
  // First key of tile t.
  __device__ __forceinline__ int Begin(int t) const {
    return t < init_tiles ? t * kKeyTile : local_aligned + (t - init_tiles) * kKeyTile;
  }
};

}  // namespace anchorserve::cuda::id_detail

namespace anchorserve::cuda {

// identification_wgmma.cu. Each returns the first CUDA error of its launch.
// Anchor x(i) and the per-tile pooling sums (same outputs as the mma.sync AnchorKernel).
enum class WgmmaAnchorVariant {
  kOneHead,          // one query head per CTA, two CTAs per SM
  kTwoHeads,         // two query heads of one KV head per CTA (Hq/Hkv even)
  kWarpSpecialized,  // two heads per CTA, producer warpgroup + 2 consumers (Hq/Hkv even)
};
cudaError_t LaunchWgmmaAnchorKernel(const IdentificationParams& params, WgmmaAnchorVariant variant,
                                    cudaStream_t stream);
// Stripe scoring into the bitmask (same output as the mma.sync StripeScoreKernel) for shapes
// with (Hq/Hkv) * (pooled_rows / 16) a multiple of 4. `pieces`: 3 (exact split of qbar), or 2
// (bf16, d = 128 only: hi + mid, for measurement).
cudaError_t LaunchWgmmaStripeKernel(const IdentificationParams& params, int pieces,
                                    cudaStream_t stream);

}  // namespace anchorserve::cuda
