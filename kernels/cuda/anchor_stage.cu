// Stage 1 of stripe identification (spec: docs/anchorattention.md), the anchor stage: per query
// row i, x(i) = max over the anchor region A(i) of scale * q_i.k_j, and per anchor tile the fp64
// sums of the q rows and of x(i) that pooling (pooling.cu) turns into qbar_r and abar_r.
//
// It is QK^T over the anchor region with a running row max and no softmax or PV, on Hopper
// warpgroup MMAs (sm_90a): Q (A operand) and 128-key K tiles (B operand) in 128-byte-swizzled
// shared memory, m64n128k16 wgmmas into 64 fp32 registers per thread, then one FMNMX per score.
// Two kernels, chosen by the GQA ratio:
//   TwoHeadAnchorKernel: two query heads of one KV head per CTA, so one K tile load serves both;
//     a producer warpgroup feeds a ring of K stages through full/empty mbarriers to two consumer
//     warpgroups.
//   OneHeadAnchorKernel: one query head per CTA, for odd Hq / Hkv. Without a PV accumulator a CTA
//     needs few registers, so two CTAs share an SM and one's max reduction overlaps the other's
//     wgmmas. Every thread issues cp.async copies kStages - 1 tiles ahead; one CTA barrier per
//     tile publishes it (after fence.proxy.async: the wgmmas read through the async proxy); a
//     stage is overwritten only after the wgmma that read it was waited for.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/identification.h"
#include "kernels/cuda/identification_common.cuh"
#include "kernels/cuda/kv_tensor_map.h"

namespace anchorserve::cuda {
namespace {

using id_detail::kFullMask;
using id_detail::kKeyTile;
using id_detail::kRowBytes;
using id_detail::kTileRows;
using id_detail::RowCopier;
using id_detail::SmemDescriptor128;
using id_detail::SwizzledOffset128;
using id_detail::Tile;
using ptx::CpAsyncCommit;
using ptx::CpAsyncMbarrierArrive;
using ptx::CpAsyncWait;
using ptx::CpAsyncWaitAllUngrouped;
using ptx::FenceMbarrierInit;
using ptx::FenceProxyAsync;
using ptx::MbarrierArrive;
using ptx::MbarrierInit;
using ptx::MbarrierWait;
using ptx::NamedBarrierSync;
using ptx::PinRegisters;
using ptx::SetMaxRegistersDecrease;
using ptx::SetMaxRegistersIncrease;
using ptx::SmemAddress;
using ptx::WgmmaCommit;
using ptx::WgmmaFence;
using ptx::WgmmaWait;

// S[64 x 128] (+)= A (smem) * B^T (smem); accumulate = 0 overwrites S.
template <typename T>
__device__ __forceinline__ void WgmmaSs(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                        int accumulate) {
#if ANCHOR_ID_HAS_WGMMA
  ptx::WgmmaSsN128<T>(d, desc_a, desc_b, accumulate);
#endif
}

// Masks the scores of one m64n128 tile outside [range_lo, range_hi) and after the row, then
// folds them into the running row maxima. Thread rows: row0 and row0 + 8.
__device__ __forceinline__ void FoldTileMax(float (&s)[64], float (&row_max)[2], bool need_mask,
                                            int key_begin, int range_lo, int range_hi, int row0,
                                            int lane) {
  if (need_mask) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 8 * h;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = key_begin + 8 * j + 2 * (lane % 4) + e;
          if (key < range_lo || key >= range_hi || key > row) s[4 * j + 2 * h + e] = -INFINITY;
        }
      }
    }
  }
  // Four independent chains per row half keep the FMNMX latency off the critical path.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      m[j % 4] = fmaxf(m[j % 4], fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
    }
    row_max[h] = fmaxf(row_max[h], fmaxf(fmaxf(m[0], m[1]), fmaxf(m[2], m[3])));
  }
}

// ---------------------------------------------------------------------------------------------
// One-head anchor. CTA = one anchor tile (<= 128 query rows of one pooling block) x one query
// head; 2 warpgroups (64 rows each). Thread layout of the m64n128 accumulator: s[4j + 2h + e] is
// row 16 * warp + lane / 4 + 8h of the warpgroup, key 8j + 2 * (lane % 4) + e.
template <int kDim>
struct OneHeadAnchorShape {
  static constexpr int kHeads = 1;
  static constexpr int kThreads = 256 * kHeads;
  // d = 128: 2 stages keep the CTA at 97 KiB, so that two fit on an SM.
  static constexpr int kStages = kDim == 64 ? 3 : 2;
  static constexpr int kCtasPerSm = 2;
  static constexpr int kSmemBytes = (kHeads + kStages) * Tile<kDim>::kBytes + 1024;
  static constexpr int kSumParts = kThreads / (kHeads * kDim);  // threads per q-sum column
};

// One accumulator set per warpgroup (wgmma, wait, fold): two CTAs per SM overlap each other's
// folds and barriers, which beats double-buffered accumulators at one CTA per SM.
template <typename T, int kDim>
__global__ void __launch_bounds__(OneHeadAnchorShape<kDim>::kThreads,
                                  OneHeadAnchorShape<kDim>::kCtasPerSm)
    OneHeadAnchorKernel(const __grid_constant__ IdentificationParams p) {
#if ANCHOR_ID_HAS_WGMMA
  using Shape = OneHeadAnchorShape<kDim>;
  constexpr int kHeads = Shape::kHeads;
  using Geo = Tile<kDim>;
  constexpr int kThreads = Shape::kThreads;
  constexpr int kStages = Shape::kStages;
  constexpr int kSumParts = Shape::kSumParts;
  extern __shared__ uint8_t smem_raw[];
  __shared__ double warp_xsum[kThreads / 32];
  __shared__ double part_qsum[kSumParts][kHeads * kDim];
  const uint32_t base = (SmemAddress(smem_raw) + 1023u) & ~1023u;
  const uint8_t* smem_generic = smem_raw + (base - SmemAddress(smem_raw));
  auto q_tile = [&](int head) { return base + head * Geo::kBytes; };
  auto k_tile = [&](int t) { return base + (kHeads + t % kStages) * Geo::kBytes; };

  // Tile-major order: the query heads of one KV head run side by side and share K in L2.
  const int num_q_heads = p.num_q_heads;
  const int head_groups = num_q_heads / kHeads;
  const int64_t linear = int64_t{blockIdx.y} * gridDim.x + blockIdx.x;
  const int tile_index = static_cast<int>(linear / head_groups);
  const int head0 = static_cast<int>(linear % head_groups) * kHeads;
  const QueryTile tile = p.anchor_tiles[tile_index];
  const SeqDesc seq = p.seqs[tile.seq];
  const int kv_head = head0 / (num_q_heads / p.num_kv_heads);
  const int row_begin = tile.q_start;
  const int rows = tile.q_len;
  const int row_end = row_begin + rows;

  // A(i) for the tile's rows: [0, hi1) U [lo2, i], both cut at j <= i.
  const id_detail::AnchorKeyTiles<kKeyTile> keys(p.geometry, tile.group, row_end);
  const int hi1 = keys.init_hi;
  const int lo2 = keys.local_lo;
  const int tiles1 = keys.init_tiles;
  const int num_key_tiles = keys.num_tiles;

  const int tid = threadIdx.x;
  const RowCopier<kDim, kThreads> copier(tid);
  const T* k_base = static_cast<const T*>(p.k) + seq.kv_offset + kv_head * seq.kv_head_stride;
  auto load_keys = [&](int t) {
    if (t < num_key_tiles) {
      const int first = keys.Begin(t);
      const int end = t < tiles1 ? hi1 : row_end;
      copier.Copy(k_tile(t), k_base, seq.kv_token_stride, first, end - first);
    }
  };

  // Prologue groups: {Q of every head, K_0}, then K_1 .. K_{kStages-2}.
  {
    const T* q_base = static_cast<const T*>(p.q) + seq.q_offset;
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      copier.Copy(q_tile(h), q_base + (head0 + h) * seq.q_head_stride, seq.q_token_stride,
                  row_begin, rows);
    }
    load_keys(0);
    CpAsyncCommit();
#pragma unroll
    for (int s = 1; s < kStages - 1; ++s) {
      load_keys(s);
      CpAsyncCommit();
    }
  }

  const int warpgroup = tid / 128;
  const int head_local = warpgroup / 2;
  const int half = warpgroup % 2;  // rows 64 * half .. of the tile
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int row_local = half * 64 + 16 * ((tid % 128) / 32) + lane / 4;  // and row_local + 8
  const int wg_first_row = row_begin + half * 64;
  const int wg_last_row = min(wg_first_row + 63, row_end - 1);
  const bool wg_has_rows = wg_first_row < row_end;
  const uint32_t q_rows = q_tile(head_local) + half * 64 * kRowBytes;

  float row_max[2] = {-INFINITY, -INFINITY};
  // Whether this warpgroup computes key tile t (not when every key follows every row).
  auto wg_computes = [&](int t) {
    return t < num_key_tiles && wg_has_rows && keys.Begin(t) <= wg_last_row;
  };

  {
    float s[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) s[i] = 0.0f;
    for (int t = 0; t < num_key_tiles; ++t) {
      CpAsyncWait<kStages - 2>();  // K_t (and Q) have landed for this thread's copies
      FenceProxyAsync();
      __syncthreads();  // ... and for everyone's; K_{t-1}'s stage is free
      load_keys(t + kStages - 1);
      CpAsyncCommit();
      if (!wg_computes(t)) continue;
      const int key_begin = keys.Begin(t);
      const int range_lo = t < tiles1 ? 0 : lo2;
      const int range_hi = t < tiles1 ? hi1 : row_end;
      const bool need_mask = key_begin < range_lo || key_begin + kKeyTile > range_hi ||
                             key_begin + kKeyTile - 1 > wg_first_row;
      const uint32_t keys = k_tile(t);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < Geo::kKSteps; ++kk) {
        WgmmaSs<T>(s, SmemDescriptor128(q_rows + Geo::KStep(kk)),
                   SmemDescriptor128(keys + Geo::KStep(kk)), kk > 0 ? 1 : 0);
      }
      WgmmaCommit();
      WgmmaWait<0>();
      PinRegisters(s);
      FoldTileMax(s, row_max, need_mask, key_begin, range_lo, range_hi, row_begin + row_local,
                  lane);
    }
  }
  CpAsyncWait<0>();
  __syncthreads();  // the Q tiles are complete for the column sums below

  // x(i) = scale * max (scale > 0, rounding is monotone); rows are spread over a lane quad.
  double xsum = 0.0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float m = row_max[h];
    m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 1));
    m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 2));
    const float anchor = m * p.softmax_scale;
    const int row = row_local + 8 * h;
    if (lane % 4 == 0 && row < rows) {
      xsum += anchor;
      if (p.maybe_row_anchor != nullptr) {
        p.maybe_row_anchor[seq.lse_offset + int64_t{head0 + head_local} * seq.seq_len + row_begin +
                           row] = anchor;
      }
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    xsum += __shfl_xor_sync(kFullMask, xsum, offset);
  }
  if (lane == 0) warp_xsum[warp] = xsum;

  // fp64 column sums of the q rows: kSumParts threads per (head, column), rows interleaved.
  {
    const int col = tid % kDim;
    const int h = (tid / kDim) % kHeads;
    const int part = tid / (kDim * kHeads);
    const uint8_t* head_tile = smem_generic + h * Geo::kBytes;
    double sum = 0.0;
    for (int row = part; row < rows; row += kSumParts) {
      const T value = *reinterpret_cast<const T*>(
          head_tile + SwizzledOffset128(kTileRows, row, col / 8) + (col % 8) * 2);
      sum += static_cast<double>(static_cast<float>(value));
    }
    part_qsum[part][h * kDim + col] = sum;
  }
  __syncthreads();
  if (tid < kHeads * kDim) {
    double sum = part_qsum[0][tid];
#pragma unroll
    for (int part = 1; part < kSumParts; ++part) sum += part_qsum[part][tid];
    const int h = tid / kDim;
    const int col = tid % kDim;
    p.tile_qsum[(int64_t{tile_index} * num_q_heads + head0 + h) * kDim + col] = sum;
  }
  if (tid < kHeads) {
    const double* w = warp_xsum + tid * 8;  // the 8 warps of head tid
    double sum = w[0];
#pragma unroll
    for (int i = 1; i < 8; ++i) sum += w[i];
    p.tile_xsum[int64_t{tile_index} * num_q_heads + head0 + tid] = sum;
  }
#endif  // ANCHOR_ID_HAS_WGMMA
}

// ---------------------------------------------------------------------------------------------
// Two-head anchor (same outputs as OneHeadAnchorKernel), warp-specialized. CTA = one anchor tile x
// the two query heads 2p, 2p + 1 of one KV head, 3 warpgroups: warpgroup 0 (the producer) copies Q
// of both heads once with cp.async and then the K tiles into a ring of kStages stages (a whole
// 128-key tile as one bulk tensor copy when the launcher built K tensor maps, else cp.async row
// pieces), each stage published by a "full" mbarrier (an arrival of all 128 producer threads,
// cp.async.mbarrier.arrive.noinc for row copies, plus the bulk bytes) and released by an "empty"
// mbarrier (one arrival per consumer warp); warpgroups 1 and 2 (the
// consumers: rows 64 * (c - 1) .. of both heads) issue the wgmmas of both heads per key tile
// into two accumulator sets and fold head 0's maxima while head 1's wgmmas run. No CTA-wide
// barrier in the mainloop: one consumer's folds overlap the other's wgmmas, and K is read from
// L2 once for two heads.
template <int kDim>
struct TwoHeadAnchorShape {
  static constexpr int kHeads = 2;
  static constexpr int kConsumers = 2;
  static constexpr int kConsumerThreads = 128 * kConsumers;
  static constexpr int kThreads = 128 + kConsumerThreads;  // 384
  static constexpr int kStages = kDim == 128 ? 4 : 8;
  // d = 128: Q (64 KiB) + 4 K stages (128 KiB) + barriers + alignment slack = 193 KiB.
  static constexpr int kSmemBytes = (kHeads + kStages) * Tile<kDim>::kBytes + 1024 + 256;
  static constexpr int kSumParts = kConsumerThreads / (kHeads * kDim);
  // 128 x 56 + 256 x 224 (d = 128) or 128 x 64 + 256 x 216 (d = 64: the producer's row copies
  // need more) of the 64512 the launch gives a CTA (cap 168 each).
  static constexpr int kProducerRegisters = kDim == 128 ? 56 : 64;
  static constexpr int kConsumerRegisters = kDim == 128 ? 224 : 216;
  static constexpr int kEpilogueBarrier = 1;  // named barrier over the consumer threads
};

template <typename T, int kDim>
__global__ void __launch_bounds__(TwoHeadAnchorShape<kDim>::kThreads, 1)
    TwoHeadAnchorKernel(const __grid_constant__ IdentificationParams p,
                        const __grid_constant__ KvTensorMaps maps) {
#if ANCHOR_ID_HAS_WGMMA
  using Shape = TwoHeadAnchorShape<kDim>;
  using Geo = Tile<kDim>;
  constexpr int kHeads = Shape::kHeads;
  constexpr int kStages = Shape::kStages;
  constexpr int kSumParts = Shape::kSumParts;
  constexpr int kConsumerWarps = Shape::kConsumerThreads / 32;
  extern __shared__ uint8_t smem_raw[];
  __shared__ double warp_xsum[kHeads][kConsumerWarps];
  __shared__ double part_qsum[kSumParts][kHeads * kDim];
  const uint32_t base = (SmemAddress(smem_raw) + 1023u) & ~1023u;
  const uint8_t* smem_generic = smem_raw + (base - SmemAddress(smem_raw));
  auto q_tile = [&](int head) { return base + head * Geo::kBytes; };
  auto k_tile = [&](int stage) { return base + (kHeads + stage) * Geo::kBytes; };
  const uint32_t barriers = base + (kHeads + kStages) * Geo::kBytes;
  const uint32_t q_full = barriers;
  auto k_full = [&](int stage) { return barriers + 8 * (1 + stage); };
  auto k_empty = [&](int stage) { return barriers + 8 * (1 + kStages + stage); };

  const int tid = threadIdx.x;
  if (tid == 0) {
    MbarrierInit(q_full, 128);
#pragma unroll
    for (int stage = 0; stage < kStages; ++stage) {
      MbarrierInit(k_full(stage), 128);
      MbarrierInit(k_empty(stage), kConsumerWarps);
    }
    FenceMbarrierInit();
  }
  __syncthreads();

  // Tile-major order, as in OneHeadAnchorKernel.
  const int num_q_heads = p.num_q_heads;
  const int head_groups = num_q_heads / kHeads;
  const int64_t linear = int64_t{blockIdx.y} * gridDim.x + blockIdx.x;
  const int tile_index = static_cast<int>(linear / head_groups);
  const int head0 = static_cast<int>(linear % head_groups) * kHeads;
  const QueryTile tile = p.anchor_tiles[tile_index];
  const SeqDesc seq = p.seqs[tile.seq];
  const int row_begin = tile.q_start;
  const int rows = tile.q_len;
  const int row_end = row_begin + rows;

  // A(i) for the tile's rows: [0, hi1) U [lo2, i], both cut at j <= i.
  const id_detail::AnchorKeyTiles<kKeyTile> keys(p.geometry, tile.group, row_end);
  const int hi1 = keys.init_hi;
  const int lo2 = keys.local_lo;
  const int tiles1 = keys.init_tiles;
  const int num_key_tiles = keys.num_tiles;
  // A key tile is copied in bulk when it is whole (producer and consumers decide alike).
  static_assert(kKeyTile == kBulkTileKeys, "one key tile = one bulk copy");

  if (tid < 128) {
    // ------------------------------------------------------------------ producer warpgroup
    SetMaxRegistersDecrease<Shape::kProducerRegisters>();
    const int kv_head = head0 / (num_q_heads / p.num_kv_heads);
    const RowCopier<kDim, 128> copier(tid);
    const T* q_base = static_cast<const T*>(p.q) + seq.q_offset;
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      copier.Copy(q_tile(h), q_base + (head0 + h) * seq.q_head_stride, seq.q_token_stride,
                  row_begin, rows);
    }
    CpAsyncMbarrierArrive(q_full);
    const T* k_base = static_cast<const T*>(p.k) + seq.kv_offset + kv_head * seq.kv_head_stride;
    const int32_t token_base =
        KvMapTokenBase(maps, p.kv_tensor, seq.kv_offset, seq.kv_token_stride);
    for (int t = 0; t < num_key_tiles; ++t) {
      const int stage = t % kStages;
      if (t >= kStages) MbarrierWait(k_empty(stage), ((t / kStages) - 1) & 1);
      const int first = keys.Begin(t);
      const int end = t < tiles1 ? hi1 : row_end;
      if (maps.enabled != 0 && first + kKeyTile <= end) {
        static_assert(Geo::kBytes == (kDim / 64) * kBulkTileKeys * 128, "bulk tile bytes");
        BulkFillKeyTile<kDim / 64>(tid, k_tile(stage), &maps.k, maps.token_dim, k_full(stage),
                                   token_base + first, kv_head);
      } else {
        copier.Copy(k_tile(stage), k_base, seq.kv_token_stride, first, end - first);
        CpAsyncMbarrierArrive(k_full(stage));
      }
    }
    CpAsyncWaitAllUngrouped();
    return;
  }

  // -------------------------------------------------------------------- consumer warpgroups
  SetMaxRegistersIncrease<Shape::kConsumerRegisters>();
  const int ctid = tid - 128;
  const int half = ctid / 128;  // rows 64 * half .. of the tile, both heads
  const int warp = ctid / 32;
  const int lane = ctid % 32;
  const int row_local = half * 64 + 16 * ((ctid % 128) / 32) + lane / 4;  // and row_local + 8
  const int wg_first_row = row_begin + half * 64;
  const int wg_last_row = min(wg_first_row + 63, row_end - 1);
  const bool wg_has_rows = wg_first_row < row_end;
  const uint32_t q_rows0 = q_tile(0) + half * 64 * kRowBytes;
  const uint32_t q_rows1 = q_tile(1) + half * 64 * kRowBytes;

  MbarrierWait(q_full, 0);
  bool q_fenced = false;  // Q's row copies are fenced with the first tile's
  float row_max0[2] = {-INFINITY, -INFINITY};
  float row_max1[2] = {-INFINITY, -INFINITY};
  {
    float s0[64];
    float s1[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      s0[i] = 0.0f;
      s1[i] = 0.0f;
    }
    for (int t = 0; t < num_key_tiles; ++t) {
      const int stage = t % kStages;
      // Every consumer waits for every tile (also one it skips) before releasing it, so that
      // arrivals of different ring rounds never mix on one barrier.
      MbarrierWait(k_full(stage), (t / kStages) & 1);
      const int key_begin = keys.Begin(t);
      if (wg_has_rows && key_begin <= wg_last_row) {
        const int range_lo = t < tiles1 ? 0 : lo2;
        const int range_hi = t < tiles1 ? hi1 : row_end;
        const bool whole = key_begin + kKeyTile <= range_hi;  // as the producer decides
        // Row copies (Q, and K tiles not copied in bulk) write through the generic proxy, the
        // wgmmas read through the async one.
        if (!q_fenced || !whole || maps.enabled == 0) FenceProxyAsync();
        q_fenced = true;
        const bool need_mask =
            key_begin < range_lo || !whole || key_begin + kKeyTile - 1 > wg_first_row;
        const uint32_t keys = k_tile(stage);
        WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < Geo::kKSteps; ++kk) {
          WgmmaSs<T>(s0, SmemDescriptor128(q_rows0 + Geo::KStep(kk)),
                     SmemDescriptor128(keys + Geo::KStep(kk)), kk > 0 ? 1 : 0);
        }
        WgmmaCommit();
#pragma unroll
        for (int kk = 0; kk < Geo::kKSteps; ++kk) {
          WgmmaSs<T>(s1, SmemDescriptor128(q_rows1 + Geo::KStep(kk)),
                     SmemDescriptor128(keys + Geo::KStep(kk)), kk > 0 ? 1 : 0);
        }
        WgmmaCommit();
        WgmmaWait<1>();
        PinRegisters(s0);
        FoldTileMax(s0, row_max0, need_mask, key_begin, range_lo, range_hi, row_begin + row_local,
                    lane);
        WgmmaWait<0>();
        PinRegisters(s1);
        if (lane == 0) MbarrierArrive(k_empty(stage));
        FoldTileMax(s1, row_max1, need_mask, key_begin, range_lo, range_hi, row_begin + row_local,
                    lane);
        PinRegisters(s0);
      } else if (lane == 0) {
        MbarrierArrive(k_empty(stage));
      }
    }
  }

  // x(i) = scale * max (scale > 0, rounding is monotone); rows are spread over a lane quad.
#pragma unroll
  for (int head_local = 0; head_local < kHeads; ++head_local) {
    double xsum = 0.0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m = head_local == 0 ? row_max0[h] : row_max1[h];
      m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 1));
      m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 2));
      const float anchor = m * p.softmax_scale;
      const int row = row_local + 8 * h;
      if (lane % 4 == 0 && row < rows) {
        xsum += anchor;
        if (p.maybe_row_anchor != nullptr) {
          p.maybe_row_anchor[seq.lse_offset + int64_t{head0 + head_local} * seq.seq_len +
                             row_begin + row] = anchor;
        }
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      xsum += __shfl_xor_sync(kFullMask, xsum, offset);
    }
    if (lane == 0) warp_xsum[head_local][warp] = xsum;
  }

  // fp64 column sums of the q rows (landed: q_full): kSumParts threads per (head, column).
  {
    const int col = ctid % kDim;
    const int h = (ctid / kDim) % kHeads;
    const int part = ctid / (kDim * kHeads);
    const uint8_t* head_tile = smem_generic + h * Geo::kBytes;
    double sum = 0.0;
    for (int row = part; row < rows; row += kSumParts) {
      const T value = *reinterpret_cast<const T*>(
          head_tile + SwizzledOffset128(kTileRows, row, col / 8) + (col % 8) * 2);
      sum += static_cast<double>(static_cast<float>(value));
    }
    part_qsum[part][h * kDim + col] = sum;
  }
  NamedBarrierSync(Shape::kEpilogueBarrier, Shape::kConsumerThreads);
  if (ctid < kHeads * kDim) {
    double sum = part_qsum[0][ctid];
#pragma unroll
    for (int part = 1; part < kSumParts; ++part) sum += part_qsum[part][ctid];
    const int h = ctid / kDim;
    const int col = ctid % kDim;
    p.tile_qsum[(int64_t{tile_index} * num_q_heads + head0 + h) * kDim + col] = sum;
  }
  if (ctid < kHeads) {
    const double* w = warp_xsum[ctid];  // the 8 consumer warps, rows of head ctid
    double sum = w[0];
#pragma unroll
    for (int i = 1; i < kConsumerWarps; ++i) sum += w[i];
    p.tile_xsum[int64_t{tile_index} * num_q_heads + head0 + ctid] = sum;
  }
#endif  // ANCHOR_ID_HAS_WGMMA
}

// ---------------------------------------------------------------------------------------------
template <typename T, int kDim>
cudaError_t LaunchOneHeadAnchor(const IdentificationParams& p, cudaStream_t stream) {
  using Shape = OneHeadAnchorShape<kDim>;
  auto* kernel = OneHeadAnchorKernel<T, kDim>;
  cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes);
  if (error != cudaSuccess) return error;
  const dim3 grid(p.num_anchor_tiles, p.num_q_heads / Shape::kHeads);
  kernel<<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kDim>
cudaError_t LaunchTwoHeadAnchor(const IdentificationParams& p, cudaStream_t stream) {
  using Shape = TwoHeadAnchorShape<kDim>;
  auto* kernel = TwoHeadAnchorKernel<T, kDim>;
  cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes);
  if (error != cudaSuccess) return error;
  const KvTensorMaps maps =
      BuildKvTensorMaps(p.elem_type, p.head_dim, p.num_kv_heads, p.kv_tensor, p.k, nullptr);
  const dim3 grid(p.num_anchor_tiles, p.num_q_heads / Shape::kHeads);
  kernel<<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(p, maps);
  return cudaGetLastError();
}

// Two query heads per CTA share its K tiles; they must belong to one KV head.
template <typename T, int kDim>
cudaError_t LaunchAnchorTyped(const IdentificationParams& p, cudaStream_t stream) {
  const bool two_heads = (p.num_q_heads / p.num_kv_heads) % 2 == 0;
  return two_heads ? LaunchTwoHeadAnchor<T, kDim>(p, stream)
                   : LaunchOneHeadAnchor<T, kDim>(p, stream);
}

}  // namespace

LaunchResult LaunchAnchorStage(const IdentificationParams& p, cudaStream_t stream) {
  const LaunchResult shape = id_detail::CheckShape(p);
  if (!shape.ok()) return shape;
  if (p.num_anchor_tiles > 0) {
    const bool bf16 = p.elem_type == ElemType::kBf16;
    cudaError_t error;
    if (p.head_dim == 128) {
      error = bf16 ? LaunchAnchorTyped<__nv_bfloat16, 128>(p, stream)
                   : LaunchAnchorTyped<__half, 128>(p, stream);
    } else {
      error = bf16 ? LaunchAnchorTyped<__nv_bfloat16, 64>(p, stream)
                   : LaunchAnchorTyped<__half, 64>(p, stream);
    }
    if (error != cudaSuccess) return LaunchResult::Cuda(error);
  }
  return LaunchPooling(p, stream);
}

}  // namespace anchorserve::cuda
