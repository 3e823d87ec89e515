// Attention compute kernels for sm_90a: dense causal attention and AnchorAttention's
// fine-grained sparse attention, one mainloop for both. This is the baseline mainloop; the
// warp-specialized one (attention_kernel_ws.cuh) reuses its key plans, softmax and layouts, and
// attention_launch.cu chooses between them.
//
// One CTA = one query tile (up to kTileRows rows of one group of one sequence) x one query head.
// Two consumer warpgroups own 64 query rows each. Keys are visited in tiles of kTileKeys; each
// key tile comes from a "key source":
//   - a contiguous range [first, first + n_valid) (dense mode: [0, q_end); sparse mode: the
//     anchor region's initial range and local range), causal-masked where it reaches the tile's
//     rows;
//   - a list of discrete positions (sparse mode: the stripes of the tile's group, which precede
//     every row of the group, so they need no causal mask).
// Both sources load rows with cp.async 16-byte pieces into the same 128-byte-swizzled shared
// tiles, so the tensor-core part is identical: S = Q K^T by wgmma (A and B from shared memory),
// an online softmax in fp32 registers, O += P V by wgmma with P from registers. One online
// softmax runs over the union of all key tiles, so every key is counted exactly once.
//
// Pipeline per warpgroup (FA3's intra-warpgroup overlap): while the softmax of tile t runs,
// the tensor cores finish O += P_{t-1} V_{t-1}. K and V go through rings of 2 or 3 stages
// (Pipeline); all 256 threads issue the copies, a CTA barrier per key tile publishes them.
//
// Numerics: fp32 q.k accumulators, softmax scale applied in fp32 (folded with log2(e) into one
// FFMA before exp2), P rounded to the input dtype for the PV product, fp32 O accumulators,
// output rounded once to the input dtype. LSE in natural log.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/attention_params.h"

namespace anchorserve::cuda::attention_detail {

// ---------------------------------------------------------------------------------------------
// The kernel. Grid [num_tiles, Hq] (linearised tile-major so that the query heads of one KV
// head run side by side and share K/V in L2, and longer tiles listed first start first).

// Software-pipeline shape of the mainloop: K/V ring depth (copies run kStages - 1 key tiles
// ahead) and whether an iteration issues its copies before or after its wgmmas.
template <int kStagesValue, bool kLoadsFirstValue>
struct Pipeline {
  static_assert(kStagesValue == 2 || kStagesValue == 3, "2 or 3 stages");
  static constexpr int kStages = kStagesValue;
  static constexpr bool kLoadsFirst = kLoadsFirstValue;
};
// Chosen by measurement (H100, bench/RESULTS.md): dense is 5-9% faster with 2 stages and the
// copies issued before the wgmmas; sparse (random stripe gathers) is within noise of that and
// slightly ahead with 3 stages and the copies after the wgmmas at 128k.
using DenseDefaultPipeline = Pipeline<2, true>;
using SparseDefaultPipeline = Pipeline<3, false>;

template <typename Elem, int kHeadDim, bool kSparse, typename Pipe>
__global__ void __launch_bounds__(kThreads, 1)
    AttentionKernel(const __grid_constant__ AttentionParams params) {
#if ANCHOR_ATTENTION_HAS_WGMMA
  using Geo = TileGeometry<kHeadDim>;
  constexpr int kOutRegs = Geo::kOutRegs;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem_base = (SmemAddress(smem_raw) + 1023u) & ~1023u;
  const uint32_t q_smem = smem_base;
  // Key tile t lives in stage t % kStages of the K ring and of the V ring.
  constexpr int kStages = Pipe::kStages;
  constexpr int kAhead = kStages - 1;  // key tiles the copies run ahead of the compute
  auto k_smem = [&](int t) { return smem_base + (1 + t % kStages) * Geo::kTileBytes; };
  auto v_smem = [&](int t) { return smem_base + (1 + kStages + t % kStages) * Geo::kTileBytes; };

  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;
  const int lane = tid % 32;
  const int warp_in_group = (tid % 128) / 32;

  const int64_t linear = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int tile_index = static_cast<int>(linear / params.num_q_heads);
  const int head = static_cast<int>(linear % params.num_q_heads);
  const QueryTile qt = params.tiles[tile_index];
  const SeqDesc seq = params.seqs[qt.seq];
  const int kv_head = head / (params.num_q_heads / params.num_kv_heads);
  const Elem* q_base = static_cast<const Elem*>(params.q) + seq.q_offset + head * seq.q_head_stride;
  const Elem* k_base =
      static_cast<const Elem*>(params.k) + seq.kv_offset + kv_head * seq.kv_head_stride;
  const Elem* v_base =
      static_cast<const Elem*>(params.v) + seq.kv_offset + kv_head * seq.kv_head_stride;
  const int q_start = qt.q_start;
  const float scale_log2 = params.softmax_scale * 1.4426950408889634f;

  const KeyPlan plan = MakeKeyPlan<kSparse>(params, qt, seq, head);
  const int num_key_tiles = plan.num_tiles;
  const TileLoader<kHeadDim> loader(tid);

  // Rows of this thread: row_local (+8) within the warpgroup's 64 rows.
  const int row_local = 16 * warp_in_group + lane / 4;
  const int row0 = q_start + 64 * warpgroup + row_local;

  float o[kOutRegs];
#pragma unroll
  for (int i = 0; i < kOutRegs; ++i) o[i] = 0.0f;
  float s[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) s[i] = 0.0f;
  uint32_t p[32];
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};
  float alpha[2];

  auto issue_qk = [&](uint32_t k_tile) { IssueQk<Elem, kHeadDim>(s, q_smem, warpgroup, k_tile); };
  auto issue_pv = [&](uint32_t v_tile) { IssuePv<Elem, kHeadDim>(o, p, v_tile); };
  auto softmax = [&](const KeyTile& tile) {
    SoftmaxKeyTile(s, row_max, row_sum, alpha, scale_log2, lane, row0, tile);
  };

  // Copies run kAhead key tiles ahead: iteration t (S_t = Q K_t^T, O += P_{t-1} V_{t-1})
  // issues K_{t+kAhead} and V_{t+kAhead-1}, one cp.async group per iteration, before or after
  // its wgmmas (Pipe::kLoadsFirst). At the top of iteration t all but the newest kAhead - 1
  // groups have landed, which covers K_t and V_{t-1}. A stage is rewritten only after the wgmma
  // that read it was waited for by every thread (the barrier at the top of the iteration):
  // K_{t+kAhead} reuses K_{t-1}'s stage, V_{t+kAhead-1} reuses V_{t-2}'s.
  auto load_k = [&](int t) {
    if (t < num_key_tiles) {
      loader.Keys(k_smem(t), k_base, seq.kv_token_stride, plan.Tile(t, q_start));
    }
  };
  auto load_v = [&](int t) {
    if (t < num_key_tiles) {
      loader.Keys(v_smem(t), v_base, seq.kv_token_stride, plan.Tile(t, q_start));
    }
  };
  auto load_ahead = [&](int t) {
    load_k(t + kAhead);
    load_v(t + kAhead - 1);
    CpAsyncCommit();
  };

  // Prologue groups: {Q, K_0}, then {K_j, V_{j-1}} for 0 < j < kAhead.
  loader.Contiguous(q_smem, q_base, seq.q_token_stride, q_start, qt.q_len);
  load_k(0);
  CpAsyncCommit();
#pragma unroll
  for (int j = 1; j < kAhead; ++j) {
    load_k(j);
    load_v(j - 1);
    CpAsyncCommit();
  }

  if (num_key_tiles > 0) {
    // Tile 0: S_0 = Q K_0^T and its softmax.
    CpAsyncWait<kAhead - 1>();
    FenceProxyAsync();
    __syncthreads();
    if constexpr (Pipe::kLoadsFirst) load_ahead(0);
    WgmmaFence();
    issue_qk(k_smem(0));
    WgmmaCommit();
    if constexpr (!Pipe::kLoadsFirst) load_ahead(0);
    WgmmaWait<0>();
    PinRegisters(s);
    softmax(plan.Tile(0, q_start));
    ConvertP<Elem>(s, p);

    // Steady state: S_t = Q K_t^T and O += P_{t-1} V_{t-1} in flight together; the softmax of
    // tile t overlaps the PV product.
    for (int t = 1; t < num_key_tiles; ++t) {
      CpAsyncWait<kAhead - 1>();
      FenceProxyAsync();
      __syncthreads();
      if constexpr (Pipe::kLoadsFirst) load_ahead(t);
      WgmmaFence();
      issue_qk(k_smem(t));
      WgmmaCommit();
      issue_pv(v_smem(t - 1));
      WgmmaCommit();
      if constexpr (!Pipe::kLoadsFirst) load_ahead(t);
      WgmmaWait<1>();
      PinRegisters(s);
      softmax(plan.Tile(t, q_start));
      WgmmaWait<0>();
      PinRegisters(o);
      PinRegisters(p);
      RescaleO(o, alpha);
      ConvertP<Elem>(s, p);
    }

    // Last PV product.
    CpAsyncWaitAll();
    FenceProxyAsync();
    __syncthreads();
    WgmmaFence();
    issue_pv(v_smem(num_key_tiles - 1));
    WgmmaCommit();
    WgmmaWait<0>();
    PinRegisters(o);
  }

  // Epilogue: normalise, LSE, stage O through this warpgroup's Q rows, 16-byte stores.
  CpAsyncWaitAll();  // (only matters without key tiles: the Q copy must land before reuse)
  StoreOutputTile<Elem, kHeadDim>(params, seq, q_start, qt.q_len, head, q_smem, warpgroup,
                                  tid % 128, lane, row_local, row0, o, row_max, row_sum);
#endif  // ANCHOR_ATTENTION_HAS_WGMMA
}

template <typename Kernel>
cudaError_t LaunchKernel(Kernel* kernel, int smem_bytes, const AttentionParams& params,
                         cudaStream_t stream) {
  cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (error != cudaSuccess) return error;
  const dim3 grid(static_cast<unsigned>(params.num_tiles),
                  static_cast<unsigned>(params.num_q_heads));
  kernel<<<grid, kThreads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

// Host side: launch one instantiation. Defined here, instantiated once per (dtype, head_dim) in
// attention_<dtype>_d<head_dim>.cu; the tests and the microbenchmark also instantiate other
// Pipeline shapes to compare them.
template <typename Elem, int kHeadDim, typename DensePipe = DenseDefaultPipeline,
          typename SparsePipe = SparseDefaultPipeline>
cudaError_t LaunchAttentionTyped(const AttentionParams& params, cudaStream_t stream) {
  using Geo = TileGeometry<kHeadDim>;
  if (params.num_tiles == 0) return cudaSuccess;
  if (params.sparse) {
    return LaunchKernel(AttentionKernel<Elem, kHeadDim, true, SparsePipe>,
                        Geo::SmemBytes(SparsePipe::kStages), params, stream);
  }
  return LaunchKernel(AttentionKernel<Elem, kHeadDim, false, DensePipe>,
                      Geo::SmemBytes(DensePipe::kStages), params, stream);
}

}  // namespace anchorserve::cuda::attention_detail
