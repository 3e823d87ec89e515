// Stage 2 of stripe identification (spec: docs/anchorattention.md), stripe scoring: every
// candidate key k_j of a group is selected for a query head when
// max_r(scale * qbar_r.k_j - abar_r) >= -theta over the head's pooled queries (pooling.cu). One
// CTA scores a chunk of candidate keys against the pooled queries of every query head of one KV
// head (one K tile load serves them all) and sets one bit per selected key; compaction
// (stripe_compaction.cu) turns the bits into lists.
//
// The pooled queries enter as their exact split 2^e * qbar_r = hi + mid + lo in the input dtype,
// so that three tensor-core products with fp32 accumulation give scale * qbar_r.k_j without
// rounding qbar_r to 16 bits. Two kernels with the same output:
//   WgmmaStripeKernel (sm_90a): 64 pooled rows (4 units of 16 rows) per warpgroup pass, the
//     pieces in registers as wgmma A fragments; each 128-key K tile is read once from shared
//     memory by 3 x d/16 wgmmas that accumulate in the same fp32 registers. Serves shapes with
//     at least 4 units ((Hq / Hkv) * (pooled_rows / 16)) per KV head; a last pass with fewer
//     (e.g. GQA 7) runs its idle warps on zero rows.
//   MmaSyncStripeKernel: mma.sync m16n8k16, <= 4 units per pass; serves shapes with 1-3 units.
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
using id_detail::kKeyTile;
using id_detail::RowCopier;
using id_detail::SmemDescriptor128;
using id_detail::Tile;
using ptx::CpAsync16;
using ptx::CpAsyncCommit;
using ptx::CpAsyncWait;
using ptx::FenceProxyAsync;
using ptx::LdMatrixX4;
using ptx::PinRegisters;
using ptx::SmemAddress;
using ptx::WgmmaCommit;
using ptx::WgmmaFence;
using ptx::WgmmaWait;

// 16-byte chunk index of (row, chunk) in a [rows, kChunks] tile whose chunks are XOR-swizzled by
// row % 8, so that the 8 rows an ldmatrix reads at one logical chunk hit 8 different bank groups.
template <int kChunks>
__device__ __forceinline__ int SwizzledChunk(int row, int chunk) {
  static_assert(kChunks % 8 == 0, "rows must be a multiple of 8 chunks (64 elements)");
  return row * kChunks + (chunk ^ (row & 7));
}

// S[64 x 128] (+)= A (registers) * B^T (smem).
template <typename T>
__device__ __forceinline__ void WgmmaRs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                        int accumulate) {
#if ANCHOR_ID_HAS_WGMMA
  ptx::WgmmaRsN128<T>(d, a, desc_b, accumulate);
#endif
}

// ---------------------------------------------------------------------------------------------
// mma.sync stripe scoring. CTA = one StripeItem (<= 2048 candidate keys of one group) x one KV head
// x one pass over <= 4 "units" (unit = 16 pooled rows of one query head). A warp keeps its unit's
// split pooled queries (hi, mid, lo) in registers and multiplies them with each 64-key K tile,
// all pieces accumulated in the same fp32 registers (3 MMAs per B fragment). Every tile uses all
// three pieces: a hi-only first pass with a per-key error bound costs more than the MMAs it saves.
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
    MmaSyncStripeKernel(const IdentificationParams p, int passes, int row_tiles) {
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
// wgmma stripe scoring. CTA (one warpgroup) = one StripeItem (<= 2048 keys of one group) x one KV
// head x one pass over 4 units (warp w: unit 4 * pass + w = 16 rows of one query head). Accumulator
// layout as in the anchor kernels: thread rows lane/4 and lane/4 + 8, key 8j + 2 * (lane % 4) + e.
// Three passes share the kernel:
//   kSelect (fixed theta): rows are pooled queries; a key is selected for a unit when any of its
//     16 rows passes, i.e. OR over the 8 lanes of equal lane % 4 and over the two row halves.
//   kLevels (mass target): the same margins, max over the head's pooled rows, give each candidate
//     its grid level (spec section 8), one byte per key. Needs one unit per head (step <= 16).
//   kMass (mass target): rows are each block's last query row (the sampled rows, the input dtype
//     is exact, one piece). Candidate items sum exp(min(s - x(i), 40)) per (row, level) and count
//     the keys per level; anchor-region items (kAnchorRegion) sum exp(s - x(i)) over A(i). The
//     sums go to global memory with atomics at the end of the CTA.
enum class StripePass { kSelect, kLevels, kMass };

template <int kDim, StripePass kPass>
struct StripeShape {
  static constexpr bool kMass = kPass == StripePass::kMass;
  static constexpr int kStages = kDim == 128 ? 3 : 4;
  static constexpr int kKeyCounts = kMass ? 4 * kMassGridLevels : 0;  // [4 units][kLevels]
  static constexpr int kSmemBytes = kStages * Tile<kDim>::kBytes + 1024 + 4 * kKeyCounts;
};

// Mass pass: a unit's weights by (sampled row, level) are the product W * E of its weights
// W [16 rows x keys] and the keys' one-hot levels E [keys x levels], on the tensor cores:
// mma.sync m16n8k16 takes W straight from the wgmma accumulators (the same thread owns the same
// (row, key) pairs in both layouts), split hi + lo in bf16 so that the sums keep about 16
// significant bits, and keeps the histogram in fp32 registers. Shared-memory float atomics, one
// per (row, key), serialise on keys of equal level.
constexpr int kLevelTiles = (kMassGridLevels + 7) / 8;  // n8 tiles of levels
static_assert(kLevelTiles <= 32, "one bit per level tile");

// B fragment of E for levels 8 * tile + lane / 4: `levels` holds the levels of keys 2q, 2q + 1,
// 2q + 8, 2q + 9 of a 16-key chunk (q = lane % 4) as bytes, XORed with lane / 4 in every byte;
// the two registers are bf16 pairs (1.0 where a key's level matches).
__device__ __forceinline__ void OneHotLevels(uint32_t levels, int tile, uint32_t& b0,
                                             uint32_t& b1) {
  const uint32_t diff = levels ^ (static_cast<uint32_t>(8 * tile) * 0x01010101u);
  // 0x80 in each zero byte of diff, 0 elsewhere (no carry crosses a byte), then 0xff.
  const uint32_t zero = ~(((diff & 0x7f7f7f7fu) + 0x7f7f7f7fu) | diff) & 0x80808080u;
  const uint32_t match = (zero >> 7) * 0xffu;
  b0 = __byte_perm(match, 0u, 0x1100) & 0x3f803f80u;  // keys 2q, 2q + 1: 0xffff or 0 per half
  b1 = __byte_perm(match, 0u, 0x3322) & 0x3f803f80u;
}

__device__ __forceinline__ uint32_t PackBf16(float lo_half, float hi_half) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo_half, hi_half);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// One step of the levels pass's reduce-scatter of row maxima: `in` holds 2 * kOut pairs
// [index][e]; the indices i and i | kBit form a pair (kBit a power of two below kOut). The
// thread keeps the member whose kBit is `upper`, sends the other to lane xor kLane, and keeps
// the max of its member and the partner's; `out` is indexed with kBit removed.
template <int kOut, int kBit, int kLane>
__device__ __forceinline__ void ExchangeHalf(const float (&in)[4 * kOut], float (&out)[2 * kOut],
                                             int upper) {
#pragma unroll
  for (int o = 0; o < kOut; ++o) {
    const int lower_index = ((o / kBit) * 2 * kBit) | (o % kBit);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float lower = in[2 * lower_index + e], higher = in[2 * (lower_index | kBit) + e];
      const float send = upper ? lower : higher;
      const float keep = upper ? higher : lower;
      out[2 * o + e] = fmaxf(keep, __shfl_xor_sync(kFullMask, send, kLane));
    }
  }
}

// The grid level of a pooled margin (MassLevelOf in kernels/attention_types.h, same fp32 steps):
// the smallest k with margin >= -(min_theta + k * step), or kMassGridLevels past the grid.
__device__ __forceinline__ int MassLevel(float margin, float min_theta) {
  auto threshold = [&](int k) { return min_theta + static_cast<float>(k) * kMassGridStep; };
  if (margin >= -threshold(0)) return 0;
  const float steps = (-min_theta - margin) / kMassGridStep;
  if (!(steps <= static_cast<float>(kMassGridLevels))) return kMassGridLevels;  // NaN too
  int k = max(1, static_cast<int>(ceilf(steps)));
  while (k > 1 && margin >= -threshold(k - 1)) --k;
  while (k < kMassGridLevels && margin < -threshold(k)) ++k;
  return k;
}

// A fragments (mma.m16n8k16 layout) of this warp's 16 rows, rows lane/4 (`upper`) and lane/4 + 8
// (`lower`), piece p at column p * kDim; a null row is zero.
template <int kPieces, int kDim>
__device__ __forceinline__ void LoadRowFragments(const uint16_t* upper, const uint16_t* lower,
                                                 int lane, uint32_t (&a)[kPieces][kDim / 16][4]) {
  const int quad_col = 2 * (lane & 3);
  auto word = [](const uint16_t* row, int col) {
    return row != nullptr ? *reinterpret_cast<const uint32_t*>(row + col) : 0u;
  };
#pragma unroll
  for (int piece = 0; piece < kPieces; ++piece) {
#pragma unroll
    for (int ks = 0; ks < kDim / 16; ++ks) {
      const int col = piece * kDim + ks * 16 + quad_col;
      a[piece][ks][0] = word(upper, col);
      a[piece][ks][1] = word(lower, col);
      a[piece][ks][2] = word(upper, col + 8);
      a[piece][ks][3] = word(lower, col + 8);
    }
  }
}

template <typename T, int kDim, StripePass kPass>
__global__ void __launch_bounds__(128, 2)
    WgmmaStripeKernel(const __grid_constant__ IdentificationParams p, int passes, int row_tiles) {
#if ANCHOR_ID_HAS_WGMMA
  using Geo = Tile<kDim>;
  using Shape = StripeShape<kDim, kPass>;
  constexpr bool kMass = kPass == StripePass::kMass;
  constexpr int kPieces = kMass ? 1 : 3;  // sampled rows are exact; pooled ones hi + mid + lo
  constexpr int kStages = Shape::kStages;
  constexpr int kKSteps = Geo::kKSteps;
  constexpr int kLevels = kMassGridLevels;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (SmemAddress(smem_raw) + 1023u) & ~1023u;
  auto k_tile = [&](int t) { return base + (t % kStages) * Geo::kBytes; };
  // Mass pass: [4 units][kLevels] key counts after the K stages.
  int* level_keys =
      reinterpret_cast<int*>(smem_raw + (base - SmemAddress(smem_raw)) + kStages * Geo::kBytes);

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
  // The last pass of a KV head can have fewer than 4 units (e.g. Hq / Hkv = 7): the warps past
  // the end still take part in the warpgroup's wgmmas, on zero rows that select nothing.
  const int units = gqa * row_tiles;
  const bool active = pass * 4 + warp < units;
  const int unit = active ? pass * 4 + warp : units - 1;
  const int head = kv_head * gqa + unit / row_tiles;
  const int row_tile = unit % row_tiles;
  const int64_t list = int64_t{item.batch_group} * p.num_q_heads + head;
  const int64_t pooled_row0 = list * p.pooled_rows + row_tile * 16;
  const int quad_row = lane >> 2;

  uint32_t a_frag[kPieces][kKSteps][4];
  // Pooled passes: margin = scale * (2^-e * acc) - abar in one FFMA: 2^-e * scale is exact, and
  // so is the product inside the FFMA, which rounds once (as MmaSyncStripeKernel's FFMA).
  // Mass pass: row_scale = scale and pooled_anchor = x(i) of the sampled row.
  float row_scale[2], pooled_anchor[2];
  int sampled_row[2] = {-1, -1};  // mass pass: row i of the sequence, -1 without one
  if constexpr (kMass) {
    const T* q_base = static_cast<const T*>(p.q) + seq.q_offset + head * seq.q_head_stride;
    const uint16_t* rows[2] = {nullptr, nullptr};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int block = row_tile * 16 + quad_row + 8 * h;
      const int block_rows =
          active && block < p.geometry.step
              ? p.blocks[int64_t{item.batch_group} * p.geometry.step + block].rows
              : 0;
      row_scale[h] = p.softmax_scale;
      pooled_anchor[h] = INFINITY;
      if (block_rows > 0) {
        const int i = group.row_begin + block * p.geometry.block_size + block_rows - 1;
        sampled_row[h] = i;
        rows[h] = reinterpret_cast<const uint16_t*>(q_base + int64_t{i} * seq.q_token_stride);
        pooled_anchor[h] = p.maybe_row_anchor[seq.lse_offset + int64_t{head} * seq.seq_len + i];
      }
    }
    LoadRowFragments<kPieces, kDim>(rows[0], rows[1], lane, a_frag);
    for (int idx = tid; idx < Shape::kKeyCounts; idx += 128) level_keys[idx] = 0;
  } else {
    const uint16_t* split = static_cast<const uint16_t*>(p.pooled_split);
    const uint16_t* upper = active ? split + (pooled_row0 + quad_row) * 3 * kDim : nullptr;
    const uint16_t* lower = active ? split + (pooled_row0 + quad_row + 8) * 3 * kDim : nullptr;
    LoadRowFragments<kPieces, kDim>(upper, lower, lane, a_frag);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = pooled_row0 + quad_row + 8 * h;
      row_scale[h] = p.pooled_unscale[row] * p.softmax_scale;
      // +inf for rows without queries (and inactive warps): never selected.
      pooled_anchor[h] = active ? p.pooled_anchor[row] : INFINITY;
    }
  }
  const float neg_theta = -p.theta;
  uint32_t* head_bits = p.bitmask + p.lists.list_offset[list] / 32;
  uint8_t* head_levels =
      kPass == StripePass::kSelect ? nullptr : p.mass.levels + p.lists.list_offset[list];
  const bool anchor_region = item.kind == kAnchorRegion;
  float row_sum[2] = {0.0f, 0.0f};  // mass pass: this thread's share of each row's sum
  // Mass pass: C fragments of the unit's histogram, [level tile][rows quad_row, quad_row + 8 x
  // levels 8 * tile + 2 * (lane % 4) + {0, 1}].
  float level_hist[kMass ? kLevelTiles : 1][4] = {};

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
    const int first = item.key_begin + t * kKeyTile;
    const int valid = item.key_end - first;  // keys past the chunk were zero-filled
    // Mass pass, candidates: the levels of this thread's keys, loaded while the wgmmas run.
    // chunk_levels[c] holds keys 16c + 2q, +1, 16c + 8 + 2q, +1 (q = lane % 4) as bytes; keys
    // past the chunk read as 0xff (past the grid).
    uint32_t chunk_levels[kPass == StripePass::kMass ? 8 : 1];
    if constexpr (kPass == StripePass::kMass) {
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        chunk_levels[c] = 0xffffffffu;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int key = 16 * c + 8 * half + 2 * (lane & 3);
          if (!anchor_region && active && key < valid) {
            uint32_t pair =
                *reinterpret_cast<const uint16_t*>(head_levels + (first - group.cand_begin) + key);
            if (key + 1 == valid) pair |= 0xff00u;  // the pair's second key lies in the padding
            chunk_levels[c] = (chunk_levels[c] & ~(0xffffu << (16 * half))) | (pair << (16 * half));
          }
        }
      }
    }
    WgmmaWait<0>();
    PinRegisters(acc);
#pragma unroll
    for (int piece = 0; piece < kPieces; ++piece) {
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) PinRegisters(a_frag[piece][ks]);
    }

    if constexpr (kPass == StripePass::kSelect) {
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
      if (valid < 32 * (word_lane + 1)) {
        word &= valid <= 32 * word_lane ? 0u : (1u << (valid - 32 * word_lane)) - 1u;
      }
      if (active && lane < 16 && (lane & 3) == 0 && word != 0u) {
        atomicOr(head_bits + (first - group.cand_begin) / 32 + word_lane, word);
      }
    } else if constexpr (kPass == StripePass::kLevels) {
      // Max over the 16 rows (lanes of equal lane % 4) as a reduce-scatter over the row index
      // r = lane / 4: at each exchange (lane xor 16, 8, 4: bit 2, 1, 0 of r) a thread keeps
      // the keys whose j has that bit equal to r's and sends the others, so that lane (r, q) ends
      // with the maxima of keys 8j + 2q + e for j = r and r + 8 alone: 28 shuffles instead of
      // 96, and 4 level computations per thread instead of 32. It then writes their level
      // bytes (two-byte stores: the chunk and the list start at even keys; a pair past the
      // chunk's end lies in the list's padding).
      float row_max[32];  // [j][e], over this thread's two rows
#pragma unroll
      for (int j = 0; j < 16; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          row_max[2 * j + e] = fmaxf(fmaf(acc[4 * j + e], row_scale[0], -pooled_anchor[0]),
                                     fmaf(acc[4 * j + 2 + e], row_scale[1], -pooled_anchor[1]));
        }
      }
      float by_j3_j1_j0[16];  // j bit 2 = bit 2 of r
      ExchangeHalf<8, 4, 16>(row_max, by_j3_j1_j0, (quad_row >> 2) & 1);
      float by_j3_j0[8];  // j bit 1 = bit 1 of r
      ExchangeHalf<4, 2, 8>(by_j3_j1_j0, by_j3_j0, (quad_row >> 1) & 1);
      float by_j3[4];  // j bit 0 = bit 0 of r
      ExchangeHalf<2, 1, 4>(by_j3_j0, by_j3, quad_row & 1);
#pragma unroll
      for (int j3 = 0; j3 < 2; ++j3) {
        const int key = 8 * (quad_row + 8 * j3) + 2 * (lane & 3);
        if (active && key < valid) {
          const uint32_t pair = MassLevel(by_j3[2 * j3], p.mass.min_theta) |
                                (MassLevel(by_j3[2 * j3 + 1], p.mass.min_theta) << 8);
          *reinterpret_cast<uint16_t*>(head_levels + (first - group.cand_begin) + key) =
              static_cast<uint16_t>(pair);
        }
      }
    } else if (!anchor_region) {
      // Candidates, 16 keys at a time: this thread's weights of keys 16c + 2q + {0, 1} (j = 2c)
      // and 16c + 8 + 2q + {0, 1} (j = 2c + 1) in rows quad_row and quad_row + 8 are the
      // chunk's A fragment.
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const uint32_t levels = chunk_levels[c];
        float weight[2][2][2];  // [j - 2c][h][e]; 0 past the chunk
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int j = 2 * c + half;
          const int key = 8 * j + 2 * (lane & 3);
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const uint32_t level = (levels >> (16 * half + 8 * e)) & 0xffu;
            if (active && quad_row == 0 && level < kLevels) {
              atomicAdd(level_keys + warp * kLevels + level, 1);
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const float gap = fmaf(acc[4 * j + 2 * h + e], row_scale[h], -pooled_anchor[h]);
              const bool counted = sampled_row[h] >= 0 && key + e < valid;
              weight[half][h][e] = counted ? __expf(fminf(gap, kMassWeightCeiling)) : 0.0f;
              row_sum[h] += weight[half][h][e];
            }
          }
        }
        uint32_t tiles = 0;  // level tiles this chunk's keys fall in (the same for the quad)
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t level = (levels >> (8 * b)) & 0xffu;
          if (level < kLevels) tiles |= 1u << (level / 8);
        }
        tiles = __reduce_or_sync(kFullMask, tiles);
        if (tiles == 0) continue;
        uint32_t a_hi[4], a_lo[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {  // register r: half r / 2, row half r % 2
          const float w0 = weight[r / 2][r % 2][0], w1 = weight[r / 2][r % 2][1];
          a_hi[r] = PackBf16(w0, w1);
          const __nv_bfloat162 hi = *reinterpret_cast<const __nv_bfloat162*>(&a_hi[r]);
          a_lo[r] = PackBf16(w0 - __low2float(hi), w1 - __high2float(hi));
        }
        const uint32_t my_levels = levels ^ (static_cast<uint32_t>(quad_row) * 0x01010101u);
#pragma unroll
        for (int tile = 0; tile < kLevelTiles; ++tile) {
          if (!(tiles & (1u << tile))) continue;
          uint32_t b0, b1;
          OneHotLevels(my_levels, tile, b0, b1);
          Elem<__nv_bfloat16>::Mma(level_hist[tile], a_hi, b0, b1);
          Elem<__nv_bfloat16>::Mma(level_hist[tile], a_lo, b0, b1);
        }
      }
    } else {
      // Anchor region: keys up to each sampled row (the init region always is).
#pragma unroll
      for (int j = 0; j < 16; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = 8 * j + 2 * (lane & 3) + e;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (key < valid && first + key <= sampled_row[h]) {
              row_sum[h] += expf(fmaf(acc[4 * j + 2 * h + e], row_scale[h], -pooled_anchor[h]));
            }
          }
        }
      }
    }
  }
  CpAsyncWait<0>();

  if constexpr (kMass) {
    // Row sums over the lane quad, then the shared histogram into the global one.
    float* row_total = anchor_region ? p.mass.anchor_mass : p.mass.candidate_mass;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = row_sum[h];
      sum += __shfl_xor_sync(kFullMask, sum, 1);
      sum += __shfl_xor_sync(kFullMask, sum, 2);
      if ((lane & 3) == 0 && sampled_row[h] >= 0) {
        atomicAdd(row_total + pooled_row0 + quad_row + 8 * h, sum);
      }
    }
    if (anchor_region) return;
    if (active) {
#pragma unroll
      for (int tile = 0; tile < kLevelTiles; ++tile) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int level = 8 * tile + 2 * (lane & 3) + (i & 1);
          const float weight = level_hist[tile][i];
          if (level < kLevels && weight != 0.0f) {
            atomicAdd(p.mass.level_mass + (pooled_row0 + quad_row + 8 * (i / 2)) * kLevels + level,
                      weight);
          }
        }
      }
    }
    __syncthreads();
    const int units_here = min(4, units - pass * 4);
    for (int idx = tid; idx < units_here * kLevels; idx += 128) {
      const int count = level_keys[idx];
      if (count == 0) continue;
      const int u = pass * 4 + idx / kLevels;
      const int64_t u_list =
          int64_t{item.batch_group} * p.num_q_heads + kv_head * gqa + u / row_tiles;
      atomicAdd(p.mass.level_keys + u_list * kLevels + idx % kLevels, count);
    }
  }
#endif  // ANCHOR_ID_HAS_WGMMA
}

// ---------------------------------------------------------------------------------------------
template <typename T, int kDim>
cudaError_t LaunchMmaSyncStripe(const IdentificationParams& p, cudaStream_t stream) {
  const int row_tiles = p.pooled_rows / kPooledRowTile;
  const int gqa = p.num_q_heads / p.num_kv_heads;
  const int passes = (gqa * row_tiles + 3) / 4;
  constexpr int kSmem = StripeSmemBytes<kDim>();
  cudaError_t error = cudaFuncSetAttribute(MmaSyncStripeKernel<T, kDim>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (error != cudaSuccess) return error;
  const dim3 grid(p.num_items * passes, p.num_kv_heads);
  MmaSyncStripeKernel<T, kDim><<<grid, 128, kSmem, stream>>>(p, passes, row_tiles);
  return cudaGetLastError();
}

template <typename T, int kDim, StripePass kPass>
cudaError_t LaunchWgmmaStripe(const IdentificationParams& p, int num_items, cudaStream_t stream) {
  constexpr int kSmem = StripeShape<kDim, kPass>::kSmemBytes;
  cudaError_t error = cudaFuncSetAttribute(WgmmaStripeKernel<T, kDim, kPass>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (error != cudaSuccess) return error;
  const int row_tiles = p.pooled_rows / kPooledRowTile;
  const int passes = (p.num_q_heads / p.num_kv_heads * row_tiles + 3) / 4;
  const dim3 grid(num_items * passes, p.num_kv_heads);
  WgmmaStripeKernel<T, kDim, kPass><<<grid, 128, kSmem, stream>>>(p, passes, row_tiles);
  return cudaGetLastError();
}

// Fixed theta. The wgmma kernel's 64-row passes waste a quarter or more of their MMAs when a KV
// head has fewer than 4 units (16 pooled rows of one query head); mma.sync passes size to 1, 2
// or 4.
template <typename T, int kDim>
cudaError_t LaunchSelectTyped(const IdentificationParams& p, cudaStream_t stream) {
  const int units = p.num_q_heads / p.num_kv_heads * (p.pooled_rows / kPooledRowTile);
  return units >= 4 ? LaunchWgmmaStripe<T, kDim, StripePass::kSelect>(p, p.num_items, stream)
                    : LaunchMmaSyncStripe<T, kDim>(p, stream);
}

// Mass target: levels of the candidates, then the sampled rows' weights (both wgmma: the
// histogram pass has no mma.sync variant, and its cost is set by the level pass's rows).
template <typename T, int kDim>
cudaError_t LaunchMassTyped(const IdentificationParams& p, cudaStream_t stream) {
  cudaError_t error = LaunchWgmmaStripe<T, kDim, StripePass::kLevels>(p, p.num_items, stream);
  if (error != cudaSuccess) return error;
  return LaunchWgmmaStripe<T, kDim, StripePass::kMass>(p, p.mass.num_items, stream);
}

template <typename T>
cudaError_t LaunchScoring(const IdentificationParams& p, cudaStream_t stream) {
  if (p.mass.enabled) {
    return p.head_dim == 128 ? LaunchMassTyped<T, 128>(p, stream)
                             : LaunchMassTyped<T, 64>(p, stream);
  }
  return p.head_dim == 128 ? LaunchSelectTyped<T, 128>(p, stream)
                           : LaunchSelectTyped<T, 64>(p, stream);
}

}  // namespace

LaunchResult LaunchStripeStage(const IdentificationParams& p, cudaStream_t stream) {
  const LaunchResult shape = id_detail::CheckShape(p);
  if (!shape.ok()) return shape;
  if (p.num_groups == 0) return LaunchResult::Ok();
  if (p.mass.enabled) {
    if (p.pooled_rows != kPooledRowTile) {
      return LaunchResult::InvalidArgument("mass targets need step <= 16 (one row tile per head)");
    }
    if (p.maybe_row_anchor == nullptr) {
      return LaunchResult::InvalidArgument("mass targets need the anchor stage's row anchors");
    }
    const cudaError_t error = cudaMemsetAsync(p.mass.level_mass, 0, p.mass.scratch_bytes, stream);
    if (error != cudaSuccess) return LaunchResult::Cuda(error);
  } else if (p.bitmask_words > 0) {
    const cudaError_t error =
        cudaMemsetAsync(p.bitmask, 0, p.bitmask_words * sizeof(uint32_t), stream);
    if (error != cudaSuccess) return LaunchResult::Cuda(error);
  }
  // theta = -inf selects nothing: the cleared bitmask compacts to empty lists.
  if (p.num_items > 0 && (p.mass.enabled || !(std::isinf(p.theta) && p.theta < 0))) {
    const cudaError_t error = p.elem_type == ElemType::kBf16
                                  ? LaunchScoring<__nv_bfloat16>(p, stream)
                                  : LaunchScoring<__half>(p, stream);
    if (error != cudaSuccess) return LaunchResult::Cuda(error);
  }
  if (p.mass.enabled) {
    const LaunchResult chosen = LaunchMassSelection(p, stream);
    if (!chosen.ok()) return chosen;
  }
  return LaunchStripeCompaction(p, stream);
}

}  // namespace anchorserve::cuda
