// Stripe identification on the GPU (spec: docs/anchorattention.md):
//   1. Anchor: x(i) = max over A(i) of scale * q_i.k_j on tensor cores (QK^T only), plus
//      per-tile fp64 sums of the q rows and of x(i) for pooling. Production kernel: the wgmma
//      version (identification_wgmma.cu); AnchorKernel below (mma.sync) is kept for comparison.
//   2. PoolKernel: qbar_r and abar_r per pooling block, and qbar_r written as 2^e*qbar_r =
//      hi + mid + lo in the input dtype, an exact split, so that three tensor-core products
//      with fp32 accumulation give scale * qbar_r.k_j without rounding qbar_r to 16 bits.
//   3. Stripe scoring: one CTA per (chunk of candidate keys of a group, KV head) scores the
//      chunk against the pooled queries of every query head of that KV head (one K tile load
//      serves them all) and sets one bit per selected key. The wgmma version
//      (identification_wgmma.cu) serves shapes with (Hq/Hkv) * (pooled_rows / 16) a multiple of
//      4; StripeScoreKernel (mma.sync) serves every other shape.
//   4. CompactKernel: bits -> sorted index lists (block prefix sums; deterministic), counts.
//   5. HeadStatsKernel: the spec's per-head counts, for one device->host copy per batch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/identification.cuh"
#include "kernels/cuda/identification.h"

namespace anchorserve::cuda {
namespace {

using id_detail::Elem;
using id_detail::SwizzledChunk;
using ptx::CpAsync16;
using ptx::CpAsyncCommit;
using ptx::CpAsyncWait;
using ptx::LdMatrixX4;
using ptx::SmemAddress;

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Anchor kernel. CTA = one anchor tile (<= 128 query rows of one pooling block) x kHeads query
// heads of one KV head; kMTiles m16 row tiles per warp (each K fragment loaded from shared
// memory feeds 2 * kMTiles MMAs); K in 64-key tiles through a 3-stage cp.async ring.
constexpr int kAnchorKeys = 64;
constexpr int kAnchorStages = 3;

// Measured on H100 at N = 128k (bf16, d = 128, 32 heads): 2 m16 tiles per warp (4 warps per
// head) 9.7 ms, 4 tiles per warp (255 registers, 2 warps per head) 10.2 ms.
constexpr int kAnchorMTiles = 2;

template <int kMTiles>
inline constexpr int kAnchorWarpsPerHead = kAnchorTileRows / (16 * kMTiles);

template <int kDim, int kHeads>
constexpr int AnchorSmemBytes() {
  return (kHeads * kAnchorTileRows + kAnchorStages * kAnchorKeys) * kDim * 2;
}

template <typename T, int kDim, int kHeads, int kMTiles>
__global__ void __launch_bounds__(32 * kAnchorWarpsPerHead<kMTiles> * kHeads, 2)
    AnchorKernel(const IdentificationParams p) {
  constexpr int kRows = kAnchorTileRows;
  constexpr int kChunks = kDim / 8;  // 16-byte chunks per row
  constexpr int kKSteps = kDim / 16;
  constexpr int kWarpsPerHead = kAnchorWarpsPerHead<kMTiles>;
  constexpr int kWarpRows = 16 * kMTiles;
  constexpr int kThreads = 32 * kWarpsPerHead * kHeads;
  extern __shared__ __align__(128) uint4 smem[];
  uint4* q_smem = smem;                             // [kHeads][kRows][kChunks]
  uint4* k_smem = smem + kHeads * kRows * kChunks;  // [kAnchorStages][kAnchorKeys][kChunks]
  __shared__ double warp_xsum[kHeads * kWarpsPerHead];

  const QueryTile tile = p.anchor_tiles[blockIdx.x];
  const SeqDesc seq = p.seqs[tile.seq];
  const int num_q_heads = p.num_q_heads;
  const int head0 = blockIdx.y * kHeads;
  const int kv_head = head0 / (num_q_heads / p.num_kv_heads);
  const int row_begin = tile.q_start;
  const int rows = tile.q_len;
  const int row_end = row_begin + rows;

  // A(i) for the tile's rows: [0, hi1) U [lo2, i], both cut at j <= i.
  const id_detail::AnchorKeyTiles<kAnchorKeys> keys(p.geometry, tile.group, row_end);
  const int hi1 = keys.init_hi;
  const int lo2 = keys.local_lo;
  const int tiles1 = keys.init_tiles;
  const int num_key_tiles = keys.num_tiles;

  const T* k_base = static_cast<const T*>(p.k) + seq.kv_offset + kv_head * seq.kv_head_stride;
  auto load_keys = [&](int t, int stage) {
    const int key_begin = keys.Begin(t);
    const int key_end = t < tiles1 ? hi1 : row_end;
    uint4* dst = k_smem + stage * kAnchorKeys * kChunks;
    for (int idx = threadIdx.x; idx < kAnchorKeys * kChunks; idx += kThreads) {
      const int row = idx / kChunks;
      const int chunk = idx % kChunks;
      const int key = key_begin + row;
      const bool valid = key < key_end;
      const T* src = k_base + int64_t{valid ? key : 0} * seq.kv_token_stride + chunk * 8;
      CpAsync16(SmemAddress(dst + SwizzledChunk<kChunks>(row, chunk)), src, valid);
    }
  };

  // Q tile of every head of the CTA; rows past the tile are zero.
  {
    const T* q_base = static_cast<const T*>(p.q) + seq.q_offset;
    for (int idx = threadIdx.x; idx < kHeads * kRows * kChunks; idx += kThreads) {
      const int head = idx / (kRows * kChunks);
      const int row = (idx / kChunks) % kRows;
      const int chunk = idx % kChunks;
      const bool valid = row < rows;
      const T* src = q_base + (head0 + head) * seq.q_head_stride +
                     int64_t{row_begin + (valid ? row : 0)} * seq.q_token_stride + chunk * 8;
      CpAsync16(SmemAddress(q_smem + head * kRows * kChunks + SwizzledChunk<kChunks>(row, chunk)),
                src, valid);
    }
    CpAsyncCommit();
  }
  for (int s = 0; s < kAnchorStages - 1; ++s) {
    if (s < num_key_tiles) load_keys(s, s);
    CpAsyncCommit();
  }
  CpAsyncWait<kAnchorStages - 1>();  // the Q group
  __syncthreads();

  // fp64 column sums of the q rows (pooling happens per block in PoolKernel).
  for (int idx = threadIdx.x; idx < kHeads * kDim; idx += kThreads) {
    const int head = idx / kDim;
    const int col = idx % kDim;
    const T* head_tile = reinterpret_cast<const T*>(q_smem + head * kRows * kChunks);
    double sum = 0.0;
    for (int row = 0; row < rows; ++row) {
      sum += Elem<T>::ToFloat(head_tile[SwizzledChunk<kChunks>(row, col / 8) * 8 + col % 8]);
    }
    p.tile_qsum[(int64_t{blockIdx.x} * num_q_heads + head0 + head) * kDim + col] = sum;
  }

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int head = warp / kWarpsPerHead;
  const int warp_row = (warp % kWarpsPerHead) * kWarpRows;  // within the tile

  uint32_t a_frag[kMTiles][kKSteps][4];
  {
    const uint4* head_tile = q_smem + head * kRows * kChunks;
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        const int row = warp_row + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int chunk = ks * 2 + (lane >> 4);
        LdMatrixX4(a_frag[mi][ks], SmemAddress(head_tile + SwizzledChunk<kChunks>(row, chunk)));
      }
    }
  }

  float row_max[kMTiles][2];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) row_max[mi][0] = row_max[mi][1] = -INFINITY;

  const bool warp_has_rows = warp_row < rows;
  const int warp_first_row = row_begin + warp_row;
  const int warp_last_row = min(warp_first_row + kWarpRows - 1, row_end - 1);

  for (int t = 0; t < num_key_tiles; ++t) {
    CpAsyncWait<kAnchorStages - 2>();
    __syncthreads();
    {
      const int next = t + kAnchorStages - 1;
      if (next < num_key_tiles) load_keys(next, next % kAnchorStages);
      CpAsyncCommit();
    }
    const int key_begin = keys.Begin(t);
    const int range_lo = t < tiles1 ? 0 : lo2;
    const int range_hi = t < tiles1 ? hi1 : row_end;
    if (!warp_has_rows || key_begin > warp_last_row) continue;  // every key is after every row
    const bool need_mask = key_begin < range_lo || key_begin + kAnchorKeys > range_hi ||
                           key_begin + kAnchorKeys - 1 > warp_first_row;
    const uint4* stage = k_smem + (t % kAnchorStages) * kAnchorKeys * kChunks;
    // 16 keys (two n8 tiles, one ldmatrix.x4 per k-step) at a time keeps the accumulators small
    // next to the A fragments of four m16 tiles.
#pragma unroll
    for (int part = 0; part < kAnchorKeys / 16; ++part) {
      float acc[kMTiles][2][4];
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
        for (int ni = 0; ni < 2; ++ni)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        uint32_t b[4];
        const int key = part * 16 + (lane & 7) + (lane >> 4) * 8;
        const int chunk = ks * 2 + ((lane >> 3) & 1);
        LdMatrixX4(b, SmemAddress(stage + SwizzledChunk<kChunks>(key, chunk)));
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
          Elem<T>::Mma(acc[mi][0], a_frag[mi][ks], b[0], b[1]);
          Elem<T>::Mma(acc[mi][1], a_frag[mi][ks], b[2], b[3]);
        }
      }
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 2; ++ni) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float score = acc[mi][ni][e];
            if (need_mask) {
              const int key = key_begin + part * 16 + ni * 8 + 2 * (lane & 3) + (e & 1);
              const int row = warp_first_row + mi * 16 + (lane >> 2) + (e >> 1) * 8;
              if (key < range_lo || key >= range_hi || key > row) score = -INFINITY;
            }
            row_max[mi][e >> 1] = fmaxf(row_max[mi][e >> 1], score);
          }
        }
      }
    }
  }
  CpAsyncWait<0>();

  // Rows are spread over the 4 lanes of a quad.
  double xsum = 0.0;
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float m = row_max[mi][hr];
      m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 1));
      m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 2));
      const float anchor = m * p.softmax_scale;
      const int row = warp_row + mi * 16 + (lane >> 2) + hr * 8;
      if ((lane & 3) == 0 && row < rows) {
        xsum += anchor;
        if (p.maybe_row_anchor != nullptr) {
          p.maybe_row_anchor[seq.lse_offset + int64_t{head0 + head} * seq.seq_len + row_begin +
                             row] = anchor;
        }
      }
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    xsum += __shfl_xor_sync(kFullMask, xsum, offset);
  }
  if (lane == 0) warp_xsum[warp] = xsum;
  __syncthreads();
  if (threadIdx.x < kHeads) {
    const double* w = warp_xsum + threadIdx.x * kWarpsPerHead;
    double sum = w[0];
    for (int i = 1; i < kWarpsPerHead; ++i) sum += w[i];
    p.tile_xsum[int64_t{blockIdx.x} * num_q_heads + head0 + threadIdx.x] = sum;
  }
}

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
// Stripe scoring. CTA = one StripeItem (<= 2048 candidate keys of one group) x one KV head x one
// pass over <= 4 "units" (unit = 16 pooled rows of one query head). A warp keeps its unit's
// split pooled queries (hi, mid, lo) in registers and multiplies them with each 64-key K tile,
// all pieces accumulated in the same fp32 registers (3 MMAs per B fragment).
//
// Tried and dropped (H100, N = 128k): scoring with `hi` alone first and adding mid and lo only for
// tiles with a key within the hi-only error bound of the threshold took 12.7 ms against 6.5 ms
// for always using all three pieces (the per-key bound and extra ballots cost more than the MMAs
// they save).
constexpr int kStripeKeys = 64;
constexpr int kStripeStages = 4;

template <int kDim>
constexpr int StripeSmemBytes() {
  return kStripeStages * kStripeKeys * kDim * 2;
}

// Column (key) c of an n8 tile: OR over the 16 rows = over lanes with lane % 4 == c / 2, from the
// ballots of the even and odd columns.
__device__ __forceinline__ uint32_t ColumnByte(uint32_t ballot_even, uint32_t ballot_odd) {
  uint32_t byte = 0;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (ballot_even & (0x11111111u << q)) byte |= 1u << (2 * q);
    if (ballot_odd & (0x11111111u << q)) byte |= 1u << (2 * q + 1);
  }
  return byte;
}

template <typename T, int kDim>
__global__ void __launch_bounds__(128, 3)
    StripeScoreKernel(const IdentificationParams p, int passes, int row_tiles) {
  constexpr int kChunks = kDim / 8;
  constexpr int kKSteps = kDim / 16;
  extern __shared__ __align__(128) uint4 k_smem[];  // [kStripeStages][kStripeKeys][kChunks]

  const int item_index = blockIdx.x / passes;
  const int pass = blockIdx.x % passes;
  const StripeItem item = p.items[item_index];
  const IdGroup group = p.groups[item.batch_group];
  const SeqDesc seq = p.seqs[group.seq];
  const int kv_head = blockIdx.y;
  const int gqa = p.num_q_heads / p.num_kv_heads;
  const int units = gqa * row_tiles;
  const int units_here = min(4, units - pass * 4);
  const int warps_per_unit = units_here == 1 ? 4 : (units_here == 2 ? 2 : 1);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int unit_in_pass = warp / warps_per_unit;
  const bool active = unit_in_pass < units_here;
  const int unit = pass * 4 + (active ? unit_in_pass : 0);
  const int head = kv_head * gqa + unit / row_tiles;
  const int row_tile = unit % row_tiles;
  // n-tiles (8 keys each) of every 64-key tile this warp scores: [tile_begin, tile_begin + n).
  const int ntiles_per_warp = 8 / warps_per_unit;
  const int ntile_begin = (warp % warps_per_unit) * ntiles_per_warp;

  // Split pooled queries of this unit: A fragments for rows (lane/4) and (lane/4 + 8).
  const int64_t pooled_row0 =
      (int64_t{item.batch_group} * p.num_q_heads + head) * p.pooled_rows + row_tile * 16;
  const int quad_row = lane >> 2;
  const int quad_col = 2 * (lane & 3);
  uint32_t a_frag[3][kKSteps][4];
  {
    const uint16_t* split = static_cast<const uint16_t*>(p.pooled_split);
    const uint16_t* upper = split + (pooled_row0 + quad_row) * 3 * kDim;
    const uint16_t* lower = split + (pooled_row0 + quad_row + 8) * 3 * kDim;
#pragma unroll
    for (int piece = 0; piece < 3; ++piece) {
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
  float unscale[2], pooled_anchor[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = pooled_row0 + quad_row + 8 * r;
    unscale[r] = p.pooled_unscale[row];
    pooled_anchor[r] = p.pooled_anchor[row];
  }
  const float scale = p.softmax_scale;
  const float neg_theta = -p.theta;
  uint32_t* bitmask =
      p.bitmask + p.lists.list_offset[int64_t{item.batch_group} * p.num_q_heads + head] / 32;

  const T* k_base = static_cast<const T*>(p.k) + seq.kv_offset + kv_head * seq.kv_head_stride;
  const int num_key_tiles = (item.key_end - item.key_begin + kStripeKeys - 1) / kStripeKeys;
  auto load_keys = [&](int t, int stage) {
    const int key_begin = item.key_begin + t * kStripeKeys;
    uint4* dst = k_smem + stage * kStripeKeys * kChunks;
    for (int idx = threadIdx.x; idx < kStripeKeys * kChunks; idx += 128) {
      const int row = idx / kChunks;
      const int chunk = idx % kChunks;
      const int key = key_begin + row;
      const bool valid = key < item.key_end;
      const T* src = k_base + int64_t{valid ? key : 0} * seq.kv_token_stride + chunk * 8;
      CpAsync16(SmemAddress(dst + SwizzledChunk<kChunks>(row, chunk)), src, valid);
    }
  };
  for (int s = 0; s < kStripeStages - 1; ++s) {
    if (s < num_key_tiles) load_keys(s, s);
    CpAsyncCommit();
  }

  for (int t = 0; t < num_key_tiles; ++t) {
    CpAsyncWait<kStripeStages - 2>();
    __syncthreads();
    {
      const int next = t + kStripeStages - 1;
      if (next < num_key_tiles) load_keys(next, next % kStripeStages);
      CpAsyncCommit();
    }
    if (!active) continue;
    const uint4* stage = k_smem + (t % kStripeStages) * kStripeKeys * kChunks;
    const int key_begin = item.key_begin + t * kStripeKeys;
    float acc[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        if (2 * np < ntile_begin || 2 * np >= ntile_begin + ntiles_per_warp) continue;
        uint32_t b[4];
        const int key = np * 16 + (lane & 7) + (lane >> 4) * 8;
        const int chunk = ks * 2 + ((lane >> 3) & 1);
        LdMatrixX4(b, SmemAddress(stage + SwizzledChunk<kChunks>(key, chunk)));
#pragma unroll
        for (int piece = 0; piece < 3; ++piece) {
          Elem<T>::Mma(acc[2 * np], a_frag[piece][ks], b[0], b[1]);
          Elem<T>::Mma(acc[2 * np + 1], a_frag[piece][ks], b[2], b[3]);
        }
      }
    }
    // Key (8n + c) is selected when any of the 16 rows passes.
    uint32_t words[2] = {0u, 0u};
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      if (n < ntile_begin || n >= ntile_begin + ntiles_per_warp) continue;
      bool pass_even = false;
      bool pass_odd = false;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float dot = acc[n][e] * unscale[e >> 1];  // exact: power of two
        const float margin = dot * scale - pooled_anchor[e >> 1];
        const bool selected = margin >= neg_theta;
        if (e & 1) {
          pass_odd |= selected;
        } else {
          pass_even |= selected;
        }
      }
      const uint32_t byte =
          ColumnByte(__ballot_sync(kFullMask, pass_even), __ballot_sync(kFullMask, pass_odd));
      words[n / 4] |= byte << ((n % 4) * 8);
    }
    const int valid_keys = item.key_end - key_begin;
    if (valid_keys < 32) words[0] &= (1u << valid_keys) - 1u;
    if (valid_keys < 64) words[1] &= valid_keys <= 32 ? 0u : (1u << (valid_keys - 32)) - 1u;
    const int64_t word = (key_begin - group.cand_begin) / 32;
    const uint32_t mine = lane == 0 ? words[0] : words[1];
    if (lane < 2 && mine != 0u) atomicOr(bitmask + word + lane, mine);
  }
  CpAsyncWait<0>();
}

// ---------------------------------------------------------------------------------------------
// Compaction. CTA = (batch group, query head); 256 words (8192 keys) per round. A warp writes
// the indices of its 32 words one word at a time, so each store is a contiguous run.
constexpr int kCompactThreads = 256;

__global__ void __launch_bounds__(kCompactThreads) CompactKernel(const IdentificationParams p) {
  __shared__ int warp_total[kCompactThreads / 32];
  const int64_t list = int64_t{blockIdx.x} * p.num_q_heads + blockIdx.y;
  const IdGroup group = p.groups[blockIdx.x];
  const int64_t offset = p.lists.list_offset[list];
  const int candidates = group.cand_end > group.cand_begin ? group.cand_end - group.cand_begin : 0;
  const int words = (candidates + 31) / 32;
  const uint32_t* bits = p.bitmask + offset / 32;
  int32_t* index = p.lists.index + offset;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const uint32_t lanes_below = (1u << lane) - 1u;
  int running = 0;
  for (int base = 0; base < words; base += kCompactThreads) {
    const int w = base + threadIdx.x;
    const uint32_t word = w < words ? bits[w] : 0u;
    const int count = __popc(word);
    int inclusive = count;
#pragma unroll
    for (int delta = 1; delta < 32; delta <<= 1) {
      const int other = __shfl_up_sync(kFullMask, inclusive, delta);
      if (lane >= delta) inclusive += other;
    }
    if (lane == 31) warp_total[warp] = inclusive;
    __syncthreads();
    int before = 0;
    int round_total = 0;
#pragma unroll
    for (int i = 0; i < kCompactThreads / 32; ++i) {
      if (i < warp) before += warp_total[i];
      round_total += warp_total[i];
    }
    const int first_out = running + before + inclusive - count;  // of this lane's word
    const int warp_key0 = group.cand_begin + 32 * (base + 32 * warp);
    for (int i = 0; i < 32; ++i) {
      const uint32_t word_i = __shfl_sync(kFullMask, word, i);
      const int out_i = __shfl_sync(kFullMask, first_out, i);
      if ((word_i >> lane) & 1u) {
        index[out_i + __popc(word_i & lanes_below)] = warp_key0 + 32 * i + lane;
      }
    }
    running += round_total;
    __syncthreads();  // warp_total is reused
  }
  if (threadIdx.x == 0) p.lists.count[list] = running;
}

// ---------------------------------------------------------------------------------------------
// Per-head metrics. CTA = (sequence, query head).
constexpr int kStatsThreads = 128;

__global__ void __launch_bounds__(kStatsThreads)
    HeadStatsKernel(const IdentificationParams p, bool dense) {
  __shared__ long long shared[6][kStatsThreads / 32];
  const SeqDesc seq = p.seqs[blockIdx.x];
  const int head = blockIdx.y;
  if (dense) {  // every causal entry, no stripes (as the reference reports dense mode)
    if (threadIdx.x == 0) {
      DeviceHeadStats stats{};
      stats.computed_entries = int64_t{seq.seq_len} * (seq.seq_len + 1) / 2;
      p.head_stats[int64_t{blockIdx.x} * p.num_q_heads + head] = stats;
    }
    return;
  }
  const int64_t group_size = p.geometry.group_size;
  const int64_t init_end = int64_t{p.geometry.init_groups} * group_size;
  const int num_groups = static_cast<int>((seq.seq_len + group_size - 1) / group_size);
  long long anchor_entries = 0, stripe_entries = 0, groups = 0, total = 0;
  long long minimum = LLONG_MAX, maximum = 0;
  for (int g = threadIdx.x; g < num_groups; g += kStatsThreads) {
    const int64_t batch_group = int64_t{seq.group_begin} + g;
    const IdGroup group = p.groups[batch_group];
    const int64_t local_begin = id_detail::LocalRegionBegin(p.geometry, g);
    anchor_entries += AnchorEntriesOfGroup(group.row_begin, group.rows, init_end, local_begin);
    const int candidates = group.cand_end - group.cand_begin;
    if (candidates > 0) {
      const long long selected = p.lists.count[batch_group * p.num_q_heads + head];
      ++groups;
      total += selected;
      stripe_entries += selected * group.rows;
      minimum = selected < minimum ? selected : minimum;
      maximum = selected > maximum ? selected : maximum;
    }
  }
  long long values[6] = {anchor_entries, stripe_entries, groups, total, minimum, maximum};
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int v = 0; v < 6; ++v) {
    long long x = values[v];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const long long y = __shfl_xor_sync(kFullMask, x, offset);
      x = v == 4 ? (y < x ? y : x) : (v == 5 ? (y > x ? y : x) : x + y);
    }
    if (lane == 0) shared[v][warp] = x;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int v = 0; v < 6; ++v) {
      long long x = shared[v][0];
      for (int w = 1; w < kStatsThreads / 32; ++w) {
        const long long y = shared[v][w];
        x = v == 4 ? (y < x ? y : x) : (v == 5 ? (y > x ? y : x) : x + y);
      }
      values[v] = x;
    }
    DeviceHeadStats stats;
    stats.computed_entries = values[0] + values[1];
    stats.stripe_entries = values[1];
    stats.stripe_groups = values[2];
    stats.stripes_total = values[3];
    stats.stripes_min = values[2] > 0 ? values[4] : 0;
    stats.stripes_max = values[5];
    p.head_stats[int64_t{blockIdx.x} * p.num_q_heads + head] = stats;
  }
}

// ---------------------------------------------------------------------------------------------
template <typename T, int kDim, int kHeads, int kMTiles>
cudaError_t LaunchAnchorKernel(const IdentificationParams& p, cudaStream_t stream) {
  constexpr int kSmem = AnchorSmemBytes<kDim, kHeads>();
  cudaError_t error = cudaFuncSetAttribute(AnchorKernel<T, kDim, kHeads, kMTiles>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (error != cudaSuccess) return error;
  const dim3 grid(p.num_anchor_tiles, p.num_q_heads / kHeads);
  constexpr int kThreads = 32 * kAnchorWarpsPerHead<kMTiles> * kHeads;
  AnchorKernel<T, kDim, kHeads, kMTiles><<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kDim, int kHeads>
cudaError_t LaunchMmaSyncAnchor(const IdentificationParams& p, cudaStream_t stream) {
  if (p.num_anchor_tiles == 0) return cudaSuccess;
  return LaunchAnchorKernel<T, kDim, kHeads, kAnchorMTiles>(p, stream);
}

cudaError_t LaunchMmaSyncAnchorStage(const IdentificationParams& p, bool pair,
                                     cudaStream_t stream) {
  const bool bf16 = p.elem_type == ElemType::kBf16;
  if (p.head_dim == 128) {
    if (bf16) {
      return pair ? LaunchMmaSyncAnchor<__nv_bfloat16, 128, 2>(p, stream)
                  : LaunchMmaSyncAnchor<__nv_bfloat16, 128, 1>(p, stream);
    }
    return pair ? LaunchMmaSyncAnchor<__half, 128, 2>(p, stream)
                : LaunchMmaSyncAnchor<__half, 128, 1>(p, stream);
  }
  if (bf16) {
    return pair ? LaunchMmaSyncAnchor<__nv_bfloat16, 64, 2>(p, stream)
                : LaunchMmaSyncAnchor<__nv_bfloat16, 64, 1>(p, stream);
  }
  return pair ? LaunchMmaSyncAnchor<__half, 64, 2>(p, stream)
              : LaunchMmaSyncAnchor<__half, 64, 1>(p, stream);
}

template <typename T, int kDim>
cudaError_t LaunchPool(const IdentificationParams& p, cudaStream_t stream) {
  if (p.num_groups == 0) return cudaSuccess;
  const dim3 grid(p.num_groups * p.pooled_rows, p.num_q_heads);
  PoolKernel<T, kDim><<<grid, kDim, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kDim>
cudaError_t LaunchStripeTyped(const IdentificationParams& p, cudaStream_t stream) {
  const int row_tiles = p.pooled_rows / kPooledRowTile;
  const int gqa = p.num_q_heads / p.num_kv_heads;
  const int passes = (gqa * row_tiles + 3) / 4;
  constexpr int kSmem = StripeSmemBytes<kDim>();
  cudaError_t error = cudaFuncSetAttribute(StripeScoreKernel<T, kDim>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (error != cudaSuccess) return error;
  const dim3 grid(p.num_items * passes, p.num_kv_heads);
  StripeScoreKernel<T, kDim><<<grid, 128, kSmem, stream>>>(p, passes, row_tiles);
  return cudaGetLastError();
}

// Production anchor kernel: warp-specialized, two heads per CTA (one head when Hq/Hkv is odd).
// H100, 128k, theta 12, one run: 6.18 ms against 6.26 (one head) and 6.91 (two heads, no
// producer) ms; bench/RESULTS.md. Earlier: two heads measured within noise of one head per CTA
// (489-496 vs 463-528 TFLOP/s over two runs).
constexpr AnchorKernelChoice kDefaultAnchorKernel = AnchorKernelChoice::kWgmmaWarpSpecialized;

bool ValidShape(const IdentificationParams& p) {
  return (p.head_dim == 64 || p.head_dim == 128) && p.num_kv_heads > 0 &&
         p.num_q_heads % p.num_kv_heads == 0 && p.pooled_rows % kPooledRowTile == 0 &&
         p.pooled_rows >= p.geometry.step;
}

}  // namespace

int AnchorHeadsPerCta(int num_q_heads, int num_kv_heads) {
  return (num_q_heads / num_kv_heads) % 2 == 0 ? 2 : 1;
}

cudaError_t LaunchAnchorStage(const IdentificationParams& p, cudaStream_t stream) {
  if (!ValidShape(p)) return cudaErrorInvalidValue;
  const bool pair = AnchorHeadsPerCta(p.num_q_heads, p.num_kv_heads) == 2;
  AnchorKernelChoice choice = p.anchor_kernel;
  if (choice == AnchorKernelChoice::kDefault) choice = kDefaultAnchorKernel;
  cudaError_t error = cudaSuccess;
  if (choice == AnchorKernelChoice::kMmaSync) {
    error = LaunchMmaSyncAnchorStage(p, pair, stream);
  } else {
    WgmmaAnchorVariant variant = WgmmaAnchorVariant::kOneHead;
    if (pair && choice == AnchorKernelChoice::kWgmmaTwoHeads) {
      variant = WgmmaAnchorVariant::kTwoHeads;
    } else if (pair && choice == AnchorKernelChoice::kWgmmaWarpSpecialized) {
      variant = WgmmaAnchorVariant::kWarpSpecialized;
    }
    error = LaunchWgmmaAnchorKernel(p, variant, stream);
  }
  if (error != cudaSuccess) return error;
  return LaunchPooling(p, stream);
}

cudaError_t LaunchPooling(const IdentificationParams& p, cudaStream_t stream) {
  if (!ValidShape(p)) return cudaErrorInvalidValue;
  const bool bf16 = p.elem_type == ElemType::kBf16;
  if (p.head_dim == 128) {
    return bf16 ? LaunchPool<__nv_bfloat16, 128>(p, stream) : LaunchPool<__half, 128>(p, stream);
  }
  return bf16 ? LaunchPool<__nv_bfloat16, 64>(p, stream) : LaunchPool<__half, 64>(p, stream);
}

cudaError_t LaunchStripeStage(const IdentificationParams& p, cudaStream_t stream) {
  if (!ValidShape(p)) return cudaErrorInvalidValue;
  if (p.num_groups == 0) return cudaSuccess;
  cudaError_t error = cudaSuccess;
  if (p.bitmask_words > 0) {
    error = cudaMemsetAsync(p.bitmask, 0, p.bitmask_words * sizeof(uint32_t), stream);
    if (error != cudaSuccess) return error;
  }
  // theta = -inf selects nothing: the cleared bitmask compacts to empty lists.
  if (p.num_items > 0 && !(std::isinf(p.theta) && p.theta < 0)) {
    const int units = p.num_q_heads / p.num_kv_heads * (p.pooled_rows / kPooledRowTile);
    StripeKernelChoice choice = p.stripe_kernel;
    if (choice == StripeKernelChoice::kDefault) choice = StripeKernelChoice::kWgmma;
    if (units % 4 != 0) choice = StripeKernelChoice::kMmaSync;  // wgmma needs 64-row passes
    if (choice == StripeKernelChoice::kWgmmaTwoPieces &&
        !(p.elem_type == ElemType::kBf16 && p.head_dim == 128)) {
      choice = StripeKernelChoice::kWgmma;
    }
    if (choice == StripeKernelChoice::kMmaSync) {
      const bool bf16 = p.elem_type == ElemType::kBf16;
      if (p.head_dim == 128) {
        error = bf16 ? LaunchStripeTyped<__nv_bfloat16, 128>(p, stream)
                     : LaunchStripeTyped<__half, 128>(p, stream);
      } else {
        error = bf16 ? LaunchStripeTyped<__nv_bfloat16, 64>(p, stream)
                     : LaunchStripeTyped<__half, 64>(p, stream);
      }
    } else {
      error =
          LaunchWgmmaStripeKernel(p, choice == StripeKernelChoice::kWgmmaTwoPieces ? 2 : 3, stream);
    }
    if (error != cudaSuccess) return error;
  }
  return LaunchStripeCompaction(p, stream);
}

cudaError_t LaunchStripeCompaction(const IdentificationParams& p, cudaStream_t stream) {
  if (!ValidShape(p)) return cudaErrorInvalidValue;
  if (p.num_groups == 0) return cudaSuccess;
  CompactKernel<<<dim3(p.num_groups, p.num_q_heads), kCompactThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchHeadStats(const IdentificationParams& p, bool dense, cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  HeadStatsKernel<<<dim3(p.num_seqs, p.num_q_heads), kStatsThreads, 0, stream>>>(p, dense);
  return cudaGetLastError();
}

}  // namespace anchorserve::cuda
