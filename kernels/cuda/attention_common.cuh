// Building blocks of the attention kernel (attention_kernel.cuh): tile geometry, the MMAs, key
// plans, the online softmax and the consumer warpgroup's QK / PV issue and epilogue.
//
// Numerics: fp32 q.k accumulators, softmax scale applied in fp32 (folded with log2(e) into one
// FFMA before exp2), P rounded to the input dtype for the PV product, fp32 O accumulators,
// output rounded once to the input dtype. LSE in natural log. One online softmax runs over the
// union of all key tiles of a row, so every key is counted exactly once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/attention_params.h"
#include "kernels/cuda/ptx.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "The attention kernels use wgmma: build for sm_90a (-gencode=arch=compute_90a,code=sm_90a)."
#endif
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ANCHOR_ATTENTION_HAS_WGMMA 1
#else
#define ANCHOR_ATTENTION_HAS_WGMMA 0
#endif

namespace anchorserve::cuda::attention_detail {

// The PTX wrappers these kernels use (kernels/cuda/ptx.cuh).
using ptx::CpAsync16;
using ptx::CpAsyncMbarrierArrive;
using ptx::CpAsyncWaitAllUngrouped;
using ptx::Exp2;
using ptx::FenceMbarrierInit;
using ptx::FenceProxyAsync;
using ptx::MakeSmemDescriptor;
using ptx::MbarrierArrive;
using ptx::MbarrierInit;
using ptx::MbarrierWait;
using ptx::NamedBarrierArrive;
using ptx::NamedBarrierSync;
using ptx::PinRegisters;
using ptx::SetMaxRegistersDecrease;
using ptx::SetMaxRegistersIncrease;
using ptx::SmemAddress;
using ptx::WarpgroupBarrier;
using ptx::WgmmaCommit;
using ptx::WgmmaFence;
using ptx::WgmmaWait;

inline constexpr int kTileKeys = 128;       // keys per mainloop step
inline constexpr int kPanelRowBytes = 128;  // one swizzled row of a 64-element panel

// Shared-memory geometry of one head_dim. Q, K and V tiles all have 128 rows and are stored as
// head_dim / 64 panels of [128 rows][64 elements], each row 128 bytes with its eight 16-byte
// chunks XOR-swizzled by (row % 8): the canonical 128-byte-swizzle layout of wgmma, K-major
// for Q and K, MN-major (read transposed) for V.
template <int kHeadDim>
struct TileGeometry {
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head_dim 64 or 128");
  static constexpr int kPanels = kHeadDim / 64;
  static constexpr int kPanelBytes = 128 * kPanelRowBytes;  // 16 KiB
  static constexpr int kTileBytes = kPanels * kPanelBytes;
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte pieces per row
  static constexpr int kOutRegs = kHeadDim / 2;       // fp32 O accumulators per thread (m64 x d)
};

template <typename Elem>
__device__ __forceinline__ uint32_t PackPair(float lo, float hi) {
  if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
    __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&pair);
  } else {
    __half2 pair = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&pair);
  }
}

template <typename Elem>
__device__ __forceinline__ void MmaQk(float (&s)[64], uint64_t desc_a, uint64_t desc_b,
                                      int accumulate) {
#if ANCHOR_ATTENTION_HAS_WGMMA
  ptx::WgmmaSsN128<Elem>(s, desc_a, desc_b, accumulate);
#endif
}

template <typename Elem, int kOutRegs>
__device__ __forceinline__ void MmaPv(float (&o)[kOutRegs], const uint32_t* p, uint64_t desc_b) {
#if ANCHOR_ATTENTION_HAS_WGMMA
  if constexpr (kOutRegs == 64) {
    ptx::WgmmaRsN128TransposedB<Elem>(o, p, desc_b);
  } else {
    ptx::WgmmaRsN64TransposedB<Elem>(o, p, desc_b);
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Key sources.

// One key tile as the loader and the softmax see it.
struct KeyTile {
  const int32_t* positions;  // gathered tile: its kTileKeys (or fewer) key positions; else null
  int32_t first;             // contiguous tile: position of column 0
  int32_t n_valid;           // columns [0, n_valid) hold keys, the rest are masked
  bool needs_mask;           // some column is invalid or lies after some row of the tile
};

// The ordered key tiles of one (query tile, head): up to two contiguous ranges, then (sparse
// mode) the gathered stripe list.
struct KeyPlan {
  int32_t range_begin[2];
  int32_t range_end[2];
  int32_t range_tiles[2];
  const int32_t* stripes;
  int32_t stripe_count;
  int32_t num_tiles;

  __device__ __forceinline__ KeyTile Tile(int t, int q_start) const {
    KeyTile tile;
    tile.positions = nullptr;
    if (t < range_tiles[0] + range_tiles[1]) {
      // Selects, not a run-time array index (which would put the plan in local memory).
      const bool second = t >= range_tiles[0];
      const int local = second ? t - range_tiles[0] : t;
      tile.first = (second ? range_begin[1] : range_begin[0]) + local * kTileKeys;
      tile.n_valid = min(kTileKeys, (second ? range_end[1] : range_end[0]) - tile.first);
      // Causal mask needed when the tile's last key lies after the tile's first row.
      tile.needs_mask = tile.n_valid < kTileKeys || tile.first + tile.n_valid - 1 > q_start;
    } else {
      const int local = t - range_tiles[0] - range_tiles[1];
      tile.positions = stripes + static_cast<int64_t>(local) * kTileKeys;
      tile.first = 0;
      tile.n_valid = min(kTileKeys, stripe_count - local * kTileKeys);
      tile.needs_mask = tile.n_valid < kTileKeys;
    }
    return tile;
  }
};

__device__ __forceinline__ int32_t TilesFor(int32_t begin, int32_t end) {
  return end > begin ? (end - begin + kTileKeys - 1) / kTileKeys : 0;
}

// Dense: keys [0, q_end). Sparse: the anchor region A(i) = [0, n_init*G) u
// [max(n_init*G, (g-n_loc+1)*G), i] (both causal-masked against each row) plus the stripes of
// the tile's group (which lie in [n_init*G, (g-n_loc+1)*G) by construction).
template <bool kSparse>
__device__ __forceinline__ KeyPlan MakeKeyPlan(const AttentionParams& params, const QueryTile& qt,
                                               const SeqDesc& seq, int head) {
  KeyPlan plan;
  const int32_t q_end = qt.q_start + qt.q_len;
  plan.stripes = nullptr;
  plan.stripe_count = 0;
  if constexpr (!kSparse) {
    plan.range_begin[0] = 0;
    plan.range_end[0] = q_end;
    plan.range_begin[1] = plan.range_end[1] = 0;
  } else {
    const AnchorGeometry& geo = params.geometry;
    const int64_t group_size = geo.group_size;
    const int64_t init_end = static_cast<int64_t>(geo.init_groups) * group_size;
    const int64_t local_begin =
        max(init_end, (static_cast<int64_t>(qt.group) - geo.local_groups + 1) * group_size);
    plan.range_begin[0] = 0;
    plan.range_end[0] = static_cast<int32_t>(min(init_end, static_cast<int64_t>(q_end)));
    plan.range_begin[1] = static_cast<int32_t>(min(local_begin, static_cast<int64_t>(q_end)));
    plan.range_end[1] = q_end;
    const int64_t slot =
        static_cast<int64_t>(seq.group_begin + qt.group) * params.num_q_heads + head;
    plan.stripes = params.stripes.index + params.stripes.list_offset[slot];
    plan.stripe_count = max(0, params.stripes.count[slot]);
  }
  plan.range_tiles[0] = TilesFor(plan.range_begin[0], plan.range_end[0]);
  plan.range_tiles[1] = TilesFor(plan.range_begin[1], plan.range_end[1]);
  plan.num_tiles =
      plan.range_tiles[0] + plan.range_tiles[1] + (plan.stripe_count + kTileKeys - 1) / kTileKeys;
  return plan;
}

// ---------------------------------------------------------------------------------------------
// Online softmax over one S tile of a warpgroup. Thread layout of the m64n128 accumulator:
// s[4j + 2h + e] is row (16 * warp + lane / 4 + 8h), column (8j + 2 * (lane % 4) + e).
// On return s holds p = exp2(s * scale_log2 - m_scaled), alpha the factor that rescales the
// previous O and l of each row half.

template <bool kMasked>
__device__ __forceinline__ void SoftmaxTile(float (&s)[64], float (&row_max)[2],
                                            float (&row_sum)[2], float (&alpha)[2],
                                            float scale_log2, int lane, int row0,
                                            const KeyTile& tile) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if constexpr (kMasked) {
      const int row = row0 + 8 * h;
      const bool causal = tile.positions == nullptr;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * j + 2 * (lane % 4) + e;
          const bool keep = col < tile.n_valid && (!causal || tile.first + col <= row);
          if (!keep) s[4 * j + 2 * h + e] = -INFINITY;
        }
      }
    }
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      tile_max = fmaxf(tile_max, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float new_max = fmaxf(row_max[h], tile_max);
    // A row with no key seen yet keeps max -inf; exponentiate against 0 so nothing is NaN.
    const float max_scaled = new_max == -INFINITY ? 0.0f : new_max * scale_log2;
    alpha[h] = Exp2(row_max[h] * scale_log2 - max_scaled);
    row_max[h] = new_max;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float p = Exp2(fmaf(s[4 * j + 2 * h + e], scale_log2, -max_scaled));
        s[4 * j + 2 * h + e] = p;
        sum += p;
      }
    }
    row_sum[h] = row_sum[h] * alpha[h] + sum;  // per-thread partial; reduced in the epilogue
  }
}

// P (fp32, accumulator layout) -> A fragments of the PV wgmma: k-step kk covers columns
// 16kk..16kk+15, i.e. accumulator blocks j = 2kk and 2kk + 1.
template <typename Elem>
__device__ __forceinline__ void ConvertP(const float (&s)[64], uint32_t (&p)[32]) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    p[4 * kk + 0] = PackPair<Elem>(s[8 * kk + 0], s[8 * kk + 1]);
    p[4 * kk + 1] = PackPair<Elem>(s[8 * kk + 2], s[8 * kk + 3]);
    p[4 * kk + 2] = PackPair<Elem>(s[8 * kk + 4], s[8 * kk + 5]);
    p[4 * kk + 3] = PackPair<Elem>(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

template <int kOutRegs>
__device__ __forceinline__ void RescaleO(float (&o)[kOutRegs], const float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < kOutRegs / 4; ++j) {
    o[4 * j + 0] *= alpha[0];
    o[4 * j + 1] *= alpha[0];
    o[4 * j + 2] *= alpha[1];
    o[4 * j + 3] *= alpha[1];
  }
}

// ---------------------------------------------------------------------------------------------
// Steps of one consumer warpgroup.

// Issues S[64 x 128] = Q K^T for the warpgroup's 64 query rows. Q (A operand) and K (B operand)
// are K-major: k-step kk at panel kk / 4, byte offset (kk % 4) * 32 inside the 128-byte
// swizzled row.
template <typename Elem, int kHeadDim>
__device__ __forceinline__ void IssueQk(float (&s)[64], uint32_t q_smem, int warpgroup,
                                        uint32_t k_tile) {
  using Geo = TileGeometry<kHeadDim>;
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    const uint32_t k_offset = (kk / 4) * Geo::kPanelBytes + (kk % 4) * 32;
    const uint64_t desc_q =
        MakeSmemDescriptor(q_smem + warpgroup * 64 * kPanelRowBytes + k_offset, 16, 1024);
    const uint64_t desc_k = MakeSmemDescriptor(k_tile + k_offset, 16, 1024);
    MmaQk<Elem>(s, desc_q, desc_k, kk > 0 ? 1 : 0);
  }
}

// Issues O += P V. V (B operand, MN-major): k-step kk = keys 16kk.., 16 rows of 128 bytes
// further; panels along head_dim are kPanelBytes apart.
template <typename Elem, int kHeadDim>
__device__ __forceinline__ void IssuePv(float (&o)[TileGeometry<kHeadDim>::kOutRegs],
                                        uint32_t (&p)[32], uint32_t v_tile) {
  using Geo = TileGeometry<kHeadDim>;
#pragma unroll
  for (int kk = 0; kk < kTileKeys / 16; ++kk) {
    const uint64_t desc_v =
        MakeSmemDescriptor(v_tile + kk * 16 * kPanelRowBytes, Geo::kPanelBytes, 1024);
    MmaPv<Elem, Geo::kOutRegs>(o, &p[4 * kk], desc_v);
  }
}

// SoftmaxTile with the causal / validity mask only where the key tile needs it.
__device__ __forceinline__ void SoftmaxKeyTile(float (&s)[64], float (&row_max)[2],
                                               float (&row_sum)[2], float (&alpha)[2],
                                               float scale_log2, int lane, int row0,
                                               const KeyTile& tile) {
  if (tile.needs_mask) {
    SoftmaxTile<true>(s, row_max, row_sum, alpha, scale_log2, lane, row0, tile);
  } else {
    SoftmaxTile<false>(s, row_max, row_sum, alpha, scale_log2, lane, row0, tile);
  }
}

// Epilogue of one consumer warpgroup: normalise O, write the LSE, stage O through the
// warpgroup's own 64 Q rows in shared memory (only its own wgmmas read them, and all of them
// have completed), then 16-byte stores. thread_in_group = thread index within the warpgroup;
// row_local / row0 as in the mainloop (this thread's first row within the warpgroup / sequence).
template <typename Elem, int kHeadDim>
__device__ __forceinline__ void StoreOutputTile(const AttentionParams& params, const SeqDesc& seq,
                                                int q_start, int q_len, int head, uint32_t q_smem,
                                                int warpgroup, int thread_in_group, int lane,
                                                int row_local, int row0,
                                                const float (&o)[TileGeometry<kHeadDim>::kOutRegs],
                                                const float (&row_max)[2],
                                                const float (&row_sum)[2]) {
  using Geo = TileGeometry<kHeadDim>;
  constexpr int kOutRegs = Geo::kOutRegs;
  float inv_sum[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float total = row_sum[h];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    inv_sum[h] = total > 0.0f ? 1.0f / total : 0.0f;
    const int row = row0 + 8 * h;
    if (params.maybe_lse != nullptr && lane % 4 == 0 && row < q_start + q_len) {
      const float lse = total > 0.0f ? row_max[h] * params.softmax_scale + logf(total) : -INFINITY;
      params.maybe_lse[seq.lse_offset + static_cast<int64_t>(head) * seq.seq_len + row] = lse;
    }
  }
  const int tile_row_base = 64 * warpgroup;
#pragma unroll
  for (int j = 0; j < kOutRegs / 4; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int tile_row = tile_row_base + row_local + 8 * h;
      const uint32_t addr = q_smem + (j / 8) * Geo::kPanelBytes + tile_row * kPanelRowBytes +
                            (((j % 8) ^ (tile_row % 8)) << 4) + (lane % 4) * 4;
      const uint32_t packed =
          PackPair<Elem>(o[4 * j + 2 * h] * inv_sum[h], o[4 * j + 2 * h + 1] * inv_sum[h]);
      asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(packed) : "memory");
    }
  }
  WarpgroupBarrier(warpgroup);
  constexpr int kRowsPerStep = 128 / Geo::kChunksPerRow;
  const int chunk = thread_in_group % Geo::kChunksPerRow;
  Elem* out_base = static_cast<Elem*>(params.out) + seq.q_offset + head * seq.q_head_stride;
#pragma unroll
  for (int step = 0; step < 64 / kRowsPerStep; ++step) {
    const int tile_row = tile_row_base + thread_in_group / Geo::kChunksPerRow + step * kRowsPerStep;
    if (tile_row >= q_len) continue;
    const uint32_t addr = q_smem + (chunk / 8) * Geo::kPanelBytes + tile_row * kPanelRowBytes +
                          (((chunk % 8) ^ (tile_row % 8)) << 4);
    uint4 value;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(value.x), "=r"(value.y), "=r"(value.z), "=r"(value.w)
                 : "r"(addr));
    *reinterpret_cast<uint4*>(out_base + (q_start + tile_row) * seq.q_token_stride + chunk * 8) =
        value;
  }
}

}  // namespace anchorserve::cuda::attention_detail
