// Device helpers shared by the stripe-identification kernels (anchor_stage.cu, pooling.cu,
// stripe_scoring.cu, stripe_compaction.cu, head_stats.cu): element traits, the 128-byte-swizzled
// shared tiles of the wgmma kernels with their descriptors and row copier, the anchor region's
// local begin, and the shape check of the stage launchers. The PTX wrappers themselves
// (cp.async, ldmatrix, wgmma, ...) are in ptx.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/identification_types.h"
#include "kernels/cuda/launch_result.h"
#include "kernels/cuda/ptx.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "The identification kernels use wgmma: build for sm_90a (compute_90a, sm_90a)."
#endif
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ANCHOR_ID_HAS_WGMMA 1
#else
#define ANCHOR_ID_HAS_WGMMA 0
#endif

namespace anchorserve::cuda::id_detail {

inline constexpr unsigned kFullMask = 0xffffffffu;

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

// ---------------------------------------------------------------------------------------------
// Shared tiles of the wgmma kernels (sm_90a). Operands are K-major tiles of [rows][64-element
// panel] with 128-byte rows whose eight 16-byte chunks are XOR-swizzled by row % 8 (the
// canonical 128B swizzle; tile bases aligned to 1024 bytes).
inline constexpr int kKeyTile = 128;   // keys per wgmma (N) and per shared-memory stage
inline constexpr int kTileRows = 128;  // rows of a shared tile (Q: kAnchorTileRows; K: kKeyTile)
inline constexpr int kRowBytes = 128;  // one swizzled row of a 64-element panel
static_assert(kAnchorTileRows == kTileRows, "one Q tile = one 128-row shared tile");

// Byte offset of (row, 16-byte chunk c) in a tile of `rows` rows:
// (c / 8) * rows * 128 + row * 128 + ((c % 8) ^ (row % 8)) * 16.
__device__ __forceinline__ uint32_t SwizzledOffset128(int rows, int row, int chunk) {
  return static_cast<uint32_t>((chunk / 8) * rows * 128 + row * 128 +
                               (((chunk % 8) ^ (row % 8)) << 4));
}

// Descriptor of a K-major operand in that layout: 8-row core groups 1024 bytes apart, 128B swizzle
// (the leading offset is unused for swizzled K-major operands).
__device__ __forceinline__ uint64_t SmemDescriptor128(uint32_t address) {
  return ptx::MakeSmemDescriptor(address, /*leading_bytes=*/16, /*stride_bytes=*/1024);
}

// A [128 rows, kDim] tile in shared memory: kDim / 64 panels of [128][128 bytes].
template <int kDim>
struct Tile {
  static_assert(kDim == 64 || kDim == 128, "head_dim 64 or 128");
  static constexpr int kKSteps = kDim / 16;
  static constexpr int kPanelBytes = kTileRows * kRowBytes;
  static constexpr int kBytes = kTileRows * kDim * 2;
  // Byte offset of k-step kk (columns 16kk..16kk+15) of row 0.
  static __device__ __forceinline__ uint32_t KStep(int kk) {
    return (kk / 4) * kPanelBytes + (kk % 4) * 32;
  }
};

// Copies rows of a [rows, kDim] global matrix into a 128-row shared tile with kThreads threads:
// each thread always copies the same 16-byte chunk column, of rows kRowsPerPass apart (a
// multiple of 8, so its swizzled offset moves by whole rows).
template <int kDim, int kThreads>
struct RowCopier {
  static constexpr int kChunks = kDim / 8;
  static constexpr int kRowsPerPass = kThreads / kChunks;
  static constexpr int kPasses = kTileRows / kRowsPerPass;
  static_assert(kRowsPerPass % 8 == 0 && kTileRows % kRowsPerPass == 0, "copy geometry");
  int row0;
  int chunk;
  uint32_t offset;

  __device__ __forceinline__ explicit RowCopier(int tid)
      : row0(tid / kChunks),
        chunk(tid % kChunks),
        offset(SwizzledOffset128(kTileRows, tid / kChunks, tid % kChunks)) {}

  // Tile row r <- global row first + r for r < valid_rows; zeros for the other rows.
  template <typename T>
  __device__ __forceinline__ void Copy(uint32_t tile, const T* base, int64_t row_stride, int first,
                                       int valid_rows) const {
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int r = row0 + pass * kRowsPerPass;
      const bool valid = r < valid_rows;
      const T* src = base + (valid ? int64_t{first + r} * row_stride : 0) + chunk * 8;
      ptx::CpAsync16(tile + offset + pass * kRowsPerPass * kRowBytes, src, valid);
    }
  }
};

// ---------------------------------------------------------------------------------------------
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

// A(i) of a query tile whose rows end at `row_end`, as tiles of kKeys keys: `init_tiles` tiles
// over [0, init_hi), then tiles over [local_lo, i] from local_lo rounded down to a tile. Every
// anchor kernel walks its keys this way.
template <int kKeys>
struct AnchorKeyTiles {
  int init_hi;        // end of the initial part, cut at row_end
  int local_lo;       // start of the local part, cut at row_end
  int row_end;        // one past the tile's last row
  int init_tiles;     // tiles of the initial part
  int local_aligned;  // local_lo rounded down to kKeys
  int num_tiles;

  __device__ __forceinline__ AnchorKeyTiles(const AnchorGeometry& geometry, int group,
                                            int tile_row_end) {
    const int64_t init_end = int64_t{geometry.init_groups} * geometry.group_size;
    const int64_t local_begin = LocalRegionBegin(geometry, group);
    row_end = tile_row_end;
    init_hi = static_cast<int>(init_end < row_end ? init_end : row_end);
    local_lo = static_cast<int>(local_begin < row_end ? local_begin : row_end);
    init_tiles = (init_hi + kKeys - 1) / kKeys;
    local_aligned = local_lo / kKeys * kKeys;
    const int local_tiles = row_end > local_lo ? (row_end - local_aligned + kKeys - 1) / kKeys : 0;
    num_tiles = init_tiles + local_tiles;
  }
  // First key of tile t.
  __device__ __forceinline__ int Begin(int t) const {
    return t < init_tiles ? t * kKeys : local_aligned + (t - init_tiles) * kKeys;
  }
};

// The first precondition of the shape every stage launcher needs that does not hold.
inline LaunchResult CheckShape(const IdentificationParams& p) {
  using R = LaunchResult;
  if (p.head_dim != 64 && p.head_dim != 128)
    return R::InvalidArgument("head_dim must be 64 or 128");
  if (p.num_kv_heads < 1) return R::InvalidArgument("num_kv_heads must be >= 1");
  if (p.num_q_heads % p.num_kv_heads != 0) {
    return R::InvalidArgument("num_q_heads must be a multiple of num_kv_heads");
  }
  if (p.pooled_rows % kPooledRowTile != 0) {
    return R::InvalidArgument("pooled_rows must be a multiple of kPooledRowTile");
  }
  if (p.pooled_rows < p.geometry.step) return R::InvalidArgument("pooled_rows must be >= step");
  return R::Ok();
}

}  // namespace anchorserve::cuda::id_detail
