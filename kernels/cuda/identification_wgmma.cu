// The two tensor-core kernels of stripe identification on Hopper warpgroup MMAs (sm_90a);
// same outputs as their mma.sync versions in identification.cu (spec:
// docs/anchorattention.md).
//
//   WgmmaAnchorKernel: x(i) = max over A(i) of scale * q_i.k_j. It is QK^T over the anchor region
//     with a running row max and no softmax or PV: Q (A operand) and 128-key K tiles (B operand)
//     in 128-byte-swizzled shared memory, m64n128k16 wgmmas into 64 fp32 registers per thread,
//     then one FMNMX per score. Without a PV accumulator a CTA needs few registers, so two CTAs
//     share an SM and one's max reduction overlaps the other's wgmmas. Also writes the per-tile
//     fp64 sums of the q rows and of x(i) that PoolKernel turns into qbar_r and abar_r.
//   WsAnchorKernel: the same outputs, warp-specialized (a producer warpgroup feeding a ring of K
//     stages through full/empty mbarriers, two consumer warpgroups; see its comment).
//   WgmmaStripeKernel: scores a 2048-key chunk of a group's candidates against 64 pooled
//     queries (4 units of 16 rows: the query heads of one KV head) on one warpgroup. The pooled
//     queries' exact split pieces (hi, mid, lo; PoolKernel) stay in registers as wgmma A
//     fragments; each 128-key K tile is read once from shared memory by 3 x d/16 wgmmas that
//     accumulate in the same fp32 registers, i.e. scale * qbar.k up to fp32 accumulation.
//
// Pipelines: every thread issues 16-byte cp.async copies of a K tile kStages - 1 tiles ahead; one
// CTA barrier per tile publishes it (after fence.proxy.async: the wgmmas read through the async
// proxy); a stage is overwritten only after the wgmma that read it was waited for.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/identification.cuh"
#include "kernels/cuda/identification_types.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error \
    "identification_wgmma.cu uses wgmma: build for sm_90a (-gencode=arch=compute_90a,code=sm_90a)."
#endif

namespace anchorserve::cuda {
namespace {

using id_detail::SmemDescriptor128;
using id_detail::SwizzledOffset128;
using id_detail::WgmmaRs;
using id_detail::WgmmaSs;
using ptx::CpAsync16;
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

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kKeyTile = 128;   // keys per wgmma (N) and per shared-memory stage
constexpr int kTileRows = 128;  // rows of every shared tile (Q: kAnchorTileRows; K: kKeyTile)
constexpr int kRowBytes = 128;  // one swizzled row of a 64-element panel
static_assert(kAnchorTileRows == kTileRows, "one Q tile = one 128-row shared tile");

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
      CpAsync16(tile + offset + pass * kRowsPerPass * kRowBytes, src, valid);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Anchor. CTA = one anchor tile (<= 128 query rows of one pooling block) x kHeads query heads of
// one KV head; 2 warpgroups (64 rows each) per head. Thread layout of the m64n128 accumulator:
// s[4j + 2h + e] is row 16 * warp + lane / 4 + 8h of the warpgroup, key 8j + 2 * (lane % 4) + e.
template <int kDim, int kHeads>
struct AnchorShape {
  static constexpr int kThreads = 256 * kHeads;
  // d = 128, one head: 2 stages keep the CTA at 97 KiB, so that two fit on an SM.
  static constexpr int kStages = (kHeads == 2 || kDim == 64) ? 3 : 2;
  static constexpr int kCtasPerSm = kHeads == 1 ? 2 : 1;
  static constexpr int kSmemBytes = (kHeads + kStages) * Tile<kDim>::kBytes + 1024;
  static constexpr int kSumParts = kThreads / (kHeads * kDim);  // threads per q-sum column
};

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

// One accumulator set: wgmma, wait, fold. With one head per CTA two CTAs share an SM and
// overlap each other's folds and barriers. (Tried: two accumulator sets so that the wgmmas of
// key tile t + 1 run while tile t is folded, one CTA per SM: 384-411 TFLOP/s against 514-519
// for this version, H100, 2026-11-22.)
template <typename T, int kDim, int kHeads>
__global__ void __launch_bounds__(256 * kHeads, (AnchorShape<kDim, kHeads>::kCtasPerSm))
    WgmmaAnchorKernel(const __grid_constant__ IdentificationParams p) {
#if ANCHOR_ID_HAS_WGMMA
  using Shape = AnchorShape<kDim, kHeads>;
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
// Warp-specialized anchor (same outputs as WgmmaAnchorKernel). CTA = one anchor tile x the two
// query heads 2p, 2p + 1 of one KV head, 3 warpgroups: warpgroup 0 (the producer) copies Q of
// both heads once and then the K tiles into a ring of kStages stages with cp.async, each stage
// published by a "full" mbarrier (cp.async.mbarrier.arrive.noinc by the 128 producer threads)
// and released by an "empty" mbarrier (one arrival per consumer warp); warpgroups 1 and 2 (the
// consumers: rows 64 * (c - 1) .. of both heads) issue the wgmmas of both heads per key tile
// into two accumulator sets and fold head 0's maxima while head 1's wgmmas run. No CTA-wide
// barrier in the mainloop: one consumer's folds overlap the other's wgmmas, and K is read from
// L2 once for two heads.
template <int kDim>
struct WsAnchorShape {
  static constexpr int kHeads = 2;
  static constexpr int kConsumers = 2;
  static constexpr int kConsumerThreads = 128 * kConsumers;
  static constexpr int kThreads = 128 + kConsumerThreads;  // 384
  static constexpr int kStages = kDim == 128 ? 4 : 8;
  // d = 128: Q (64 KiB) + 4 K stages (128 KiB) + barriers + alignment slack = 193 KiB.
  static constexpr int kSmemBytes = (kHeads + kStages) * Tile<kDim>::kBytes + 1024 + 256;
  static constexpr int kSumParts = kConsumerThreads / (kHeads * kDim);
  // 128 x 56 + 256 x 224 = 64512 of the SM's 65536 (launch cap: 168 each).
  static constexpr int kProducerRegisters = 56;
  static constexpr int kConsumerRegisters = 224;
  static constexpr int kEpilogueBarrier = 1;  // named barrier over the consumer threads
};

template <typename T, int kDim>
__global__ void __launch_bounds__(WsAnchorShape<kDim>::kThreads, 1)
    WsAnchorKernel(const __grid_constant__ IdentificationParams p) {
#if ANCHOR_ID_HAS_WGMMA
  using Shape = WsAnchorShape<kDim>;
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

  // Tile-major order, as WgmmaAnchorKernel with two heads.
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
    for (int t = 0; t < num_key_tiles; ++t) {
      const int stage = t % kStages;
      if (t >= kStages) MbarrierWait(k_empty(stage), ((t / kStages) - 1) & 1);
      const int first = keys.Begin(t);
      const int end = t < tiles1 ? hi1 : row_end;
      copier.Copy(k_tile(stage), k_base, seq.kv_token_stride, first, end - first);
      CpAsyncMbarrierArrive(k_full(stage));
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
        FenceProxyAsync();
        const int range_lo = t < tiles1 ? 0 : lo2;
        const int range_hi = t < tiles1 ? hi1 : row_end;
        const bool need_mask = key_begin < range_lo || key_begin + kKeyTile > range_hi ||
                               key_begin + kKeyTile - 1 > wg_first_row;
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
// Stripe scoring. CTA (one warpgroup) = one StripeItem (<= 2048 candidate keys of one group) x
// one KV head x one pass over 4 units (warp w: unit 4 * pass + w = 16 pooled rows of one query
// head). Accumulator layout as in the anchor kernel; a key is selected for a unit when any of
// its 16 rows passes, i.e. OR over the 8 lanes of equal lane % 4 and over the two row halves.
template <int kDim>
struct StripeShape {
  static constexpr int kStages = kDim == 128 ? 3 : 4;
  static constexpr int kSmemBytes = kStages * Tile<kDim>::kBytes + 1024;  // 97 KiB at d = 128
};

template <typename T, int kDim, int kPieces>
__global__ void __launch_bounds__(128, 2)
    WgmmaStripeKernel(const __grid_constant__ IdentificationParams p, int passes, int row_tiles) {
#if ANCHOR_ID_HAS_WGMMA
  using Geo = Tile<kDim>;
  constexpr int kStages = StripeShape<kDim>::kStages;
  constexpr int kKSteps = Geo::kKSteps;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (SmemAddress(smem_raw) + 1023u) & ~1023u;
  auto k_tile = [&](int t) { return base + (t % kStages) * Geo::kBytes; };

  const int item_index = blockIdx.x / passes;
  const int pass = blockIdx.x % passes;
  const StripeItem item = p.items[item_index];
  const IdGroup group = p.groups[item.batch_group];
  const SeqDesc seq = p.seqs[group.seq];
  const int kv_head = blockIdx.y;
  const int gqa = p.num_q_heads / p.num_kv_heads;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int unit = pass * 4 + warp;
  const int head = kv_head * gqa + unit / row_tiles;
  const int row_tile = unit % row_tiles;

  // This warp's 16 pooled rows as A fragments (mma.m16n8k16 layout): rows lane/4 and lane/4 + 8.
  const int64_t pooled_row0 =
      (int64_t{item.batch_group} * p.num_q_heads + head) * p.pooled_rows + row_tile * 16;
  const int quad_row = lane >> 2;
  const int quad_col = 2 * (lane & 3);
  uint32_t a_frag[kPieces][kKSteps][4];
  {
    const uint16_t* split = static_cast<const uint16_t*>(p.pooled_split);
    const uint16_t* upper = split + (pooled_row0 + quad_row) * 3 * kDim;
    const uint16_t* lower = split + (pooled_row0 + quad_row + 8) * 3 * kDim;
#pragma unroll
    for (int piece = 0; piece < kPieces; ++piece) {
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        const int col = piece * kDim + ks * 16 + quad_col;
        a_frag[piece][ks][0] = *reinterpret_cast<const uint32_t*>(upper + col);
        a_frag[piece][ks][1] = *reinterpret_cast<const uint32_t*>(lower + col);
        a_frag[piece][ks][2] = *reinterpret_cast<const uint32_t*>(upper + col + 8);
        a_frag[piece][ks][3] = *reinterpret_cast<const uint32_t*>(lower + col + 8);
      }
    }
  }
  // margin = scale * (2^-e * acc) - abar in one FFMA: 2^-e * scale is exact, and so is the
  // product inside the FFMA, which rounds once (as the mma.sync kernel's contracted FFMA).
  float row_scale[2], pooled_anchor[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = pooled_row0 + quad_row + 8 * h;
    row_scale[h] = p.pooled_unscale[row] * p.softmax_scale;
    pooled_anchor[h] = p.pooled_anchor[row];  // +inf for rows without queries: never selected
  }
  const float neg_theta = -p.theta;
  uint32_t* head_bits =
      p.bitmask + p.lists.list_offset[int64_t{item.batch_group} * p.num_q_heads + head] / 32;

  const RowCopier<kDim, 128> copier(tid);
  const T* k_base = static_cast<const T*>(p.k) + seq.kv_offset + kv_head * seq.kv_head_stride;
  const int num_key_tiles = (item.key_end - item.key_begin + kKeyTile - 1) / kKeyTile;
  auto load_keys = [&](int t) {
    if (t < num_key_tiles) {
      const int first = item.key_begin + t * kKeyTile;
      copier.Copy(k_tile(t), k_base, seq.kv_token_stride, first, item.key_end - first);
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    load_keys(s);
    CpAsyncCommit();
  }

  const int word_lane = (lane >> 2) & 3;  // output word this lane assembles
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;

  for (int t = 0; t < num_key_tiles; ++t) {
    CpAsyncWait<kStages - 2>();
    FenceProxyAsync();
    __syncthreads();
    load_keys(t + kStages - 1);
    CpAsyncCommit();
    const uint32_t keys = k_tile(t);
    WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      const uint64_t desc = SmemDescriptor128(keys + Geo::KStep(ks));
#pragma unroll
      for (int piece = 0; piece < kPieces; ++piece) {
        WgmmaRs<T>(acc, a_frag[piece][ks], desc, (ks | piece) != 0 ? 1 : 0);
      }
    }
    WgmmaCommit();
    WgmmaWait<0>();
    PinRegisters(acc);
#pragma unroll
    for (int piece = 0; piece < kPieces; ++piece) {
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) PinRegisters(a_frag[piece][ks]);
    }

    // Bit 2j + e of `bits`: key 8j + 2 * (lane % 4) + e of the tile passes in one of this
    // thread's two rows.
    uint32_t bits = 0;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool upper = fmaf(acc[4 * j + e], row_scale[0], -pooled_anchor[0]) >= neg_theta;
        const bool lower = fmaf(acc[4 * j + 2 + e], row_scale[1], -pooled_anchor[1]) >= neg_theta;
        bits |= static_cast<uint32_t>(upper | lower) << (2 * j + e);
      }
    }
    // OR over the 16 rows: lanes of equal lane % 4.
    bits |= __shfl_xor_sync(kFullMask, bits, 4);
    bits |= __shfl_xor_sync(kFullMask, bits, 8);
    bits |= __shfl_xor_sync(kFullMask, bits, 16);
    // Word w (keys 32w .. 32w + 31) has bit 8j' + 2q + e from lane q's bit 2(4w + j') + e:
    // spread byte w of lane q's bits to 2-bit fields 8 apart, shift by 2q, OR over q.
    const uint32_t byte = (bits >> (8 * word_lane)) & 0xffu;
    uint32_t word =
        ((byte & 0x3u) | ((byte & 0xcu) << 6) | ((byte & 0x30u) << 12) | ((byte & 0xc0u) << 18))
        << (2 * (lane & 3));
    word |= __shfl_xor_sync(kFullMask, word, 1);
    word |= __shfl_xor_sync(kFullMask, word, 2);
    const int first = item.key_begin + t * kKeyTile;
    const int valid = item.key_end - first;  // keys past the chunk were zero-filled
    if (valid < 32 * (word_lane + 1)) {
      word &= valid <= 32 * word_lane ? 0u : (1u << (valid - 32 * word_lane)) - 1u;
    }
    if (lane < 16 && (lane & 3) == 0 && word != 0u) {
      atomicOr(head_bits + (first - group.cand_begin) / 32 + word_lane, word);
    }
  }
  CpAsyncWait<0>();
#endif  // ANCHOR_ID_HAS_WGMMA
}

// ---------------------------------------------------------------------------------------------
template <typename T, int kDim, int kHeads>
cudaError_t LaunchAnchorTyped(const IdentificationParams& p, cudaStream_t stream) {
  using Shape = AnchorShape<kDim, kHeads>;
  auto* kernel = WgmmaAnchorKernel<T, kDim, kHeads>;
  cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes);
  if (error != cudaSuccess) return error;
  const dim3 grid(p.num_anchor_tiles, p.num_q_heads / kHeads);
  kernel<<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kDim>
cudaError_t LaunchWsAnchorTyped(const IdentificationParams& p, cudaStream_t stream) {
  using Shape = WsAnchorShape<kDim>;
  auto* kernel = WsAnchorKernel<T, kDim>;
  cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes);
  if (error != cudaSuccess) return error;
  const dim3 grid(p.num_anchor_tiles, p.num_q_heads / Shape::kHeads);
  kernel<<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kDim>
cudaError_t LaunchAnchorVariant(const IdentificationParams& p, WgmmaAnchorVariant variant,
                                cudaStream_t stream) {
  switch (variant) {
    case WgmmaAnchorVariant::kTwoHeads:
      return LaunchAnchorTyped<T, kDim, 2>(p, stream);
    case WgmmaAnchorVariant::kWarpSpecialized:
      return LaunchWsAnchorTyped<T, kDim>(p, stream);
    default:
      return LaunchAnchorTyped<T, kDim, 1>(p, stream);
  }
}

template <typename T, int kDim, int kPieces>
cudaError_t LaunchStripeTyped(const IdentificationParams& p, cudaStream_t stream) {
  constexpr int kSmem = StripeShape<kDim>::kSmemBytes;
  cudaError_t error = cudaFuncSetAttribute(WgmmaStripeKernel<T, kDim, kPieces>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (error != cudaSuccess) return error;
  const int row_tiles = p.pooled_rows / kPooledRowTile;
  const int passes = p.num_q_heads / p.num_kv_heads * row_tiles / 4;
  const dim3 grid(p.num_items * passes, p.num_kv_heads);
  WgmmaStripeKernel<T, kDim, kPieces><<<grid, 128, kSmem, stream>>>(p, passes, row_tiles);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchWgmmaAnchorKernel(const IdentificationParams& p, WgmmaAnchorVariant variant,
                                    cudaStream_t stream) {
  if (p.num_anchor_tiles == 0) return cudaSuccess;
  if (variant != WgmmaAnchorVariant::kOneHead && (p.num_q_heads / p.num_kv_heads) % 2 != 0) {
    return cudaErrorInvalidValue;
  }
  const bool bf16 = p.elem_type == ElemType::kBf16;
  if (p.head_dim == 128) {
    return bf16 ? LaunchAnchorVariant<__nv_bfloat16, 128>(p, variant, stream)
                : LaunchAnchorVariant<__half, 128>(p, variant, stream);
  }
  if (p.head_dim == 64) {
    return bf16 ? LaunchAnchorVariant<__nv_bfloat16, 64>(p, variant, stream)
                : LaunchAnchorVariant<__half, 64>(p, variant, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t LaunchWgmmaStripeKernel(const IdentificationParams& p, int pieces,
                                    cudaStream_t stream) {
  const int units = p.num_q_heads / p.num_kv_heads * (p.pooled_rows / kPooledRowTile);
  if (units % 4 != 0) return cudaErrorInvalidValue;
  if (p.num_items == 0) return cudaSuccess;
  const bool bf16 = p.elem_type == ElemType::kBf16;
  if (pieces == 2) {
    if (!bf16 || p.head_dim != 128) return cudaErrorInvalidValue;
    return LaunchStripeTyped<__nv_bfloat16, 128, 2>(p, stream);
  }
  if (pieces != 3) return cudaErrorInvalidValue;
  if (p.head_dim == 128) {
    return bf16 ? LaunchStripeTyped<__nv_bfloat16, 128, 3>(p, stream)
                : LaunchStripeTyped<__half, 128, 3>(p, stream);
  }
  if (p.head_dim == 64) {
    return bf16 ? LaunchStripeTyped<__nv_bfloat16, 64, 3>(p, stream)
                : LaunchStripeTyped<__half, 64, 3>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace anchorserve::cuda
