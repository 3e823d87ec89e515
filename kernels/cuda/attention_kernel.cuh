// The attention kernel for sm_90a: dense causal attention and AnchorAttention's fine-grained
// sparse attention, one warp-specialized mainloop for both.
//
// One CTA = one query tile (up to 128 rows of one group of one sequence) x one query head. Keys
// are visited in tiles of kTileKeys from a key plan (attention_common.cuh): contiguous ranges
// (dense: [0, q_end); sparse: the anchor region's initial and local ranges), causal-masked where
// they reach the tile's rows, then (sparse) the gathered stripe positions of the tile's group,
// which precede every row of the group and need no causal mask. 384 threads:
//   - warpgroup 0, the producer: issues every copy (Q once, then K and V key tiles) into a ring
//     of kStages K stages and kStages V stages. A whole contiguous key tile is one bulk tensor
//     copy (TMA, one thread) when the launcher built K/V tensor maps; other tiles (gathered
//     stripe rows, partial tiles, batches without a shared K/V layout) and Q are cp.async
//     16-byte row pieces from all 128 threads. Each stage has a "full" mbarrier that completes
//     when all 128 producer threads have arrived and the bulk bytes, if any, have landed
//     (cp.async.mbarrier.arrive.noinc for row copies) and an "empty" mbarrier that completes
//     when all 8 consumer warps have finished the wgmmas that read it. No CTA-wide barrier in
//     the mainloop. It gives most of its registers away (setmaxnreg).
//   - warpgroups 1 and 2, the consumers: 64 query rows each, S = Q K^T and O += P V by wgmma
//     with FA3's two overlaps: within a warpgroup the softmax of tile t runs while the tensor
//     cores finish P_{t-1} V_{t-1}; between the warpgroups a pair of named barriers makes them
//     issue their wgmmas in turns ("ping-pong"), so one warpgroup's softmax (MUFU/ALU) runs while
//     the other's GEMMs occupy the tensor cores.
//
// Block order: with tiles_per_chunk > 0, consecutive blocks walk `tiles_per_chunk` query tiles of
// one head before the next head (chunks of the largest-first tile list), so the CTAs that run
// together share stripe lists and K/V rows in L2; with 0, all heads of a tile, then the next tile.
#pragma once

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/kv_tensor_map.h"

namespace anchorserve::cuda::attention_detail {

inline constexpr int kProducerThreads = 128;
inline constexpr int kThreads = 3 * 128;
// Register split: 128 x 40 + 256 x 232 = 64512 of the SM's 65536 (launch cap: 168 each).
inline constexpr int kProducerRegisters = 40;
inline constexpr int kConsumerRegisters = 232;
// Named barriers: 0 = __syncthreads, 1 and 2 = per-consumer-warpgroup epilogue barriers
// (WarpgroupBarrier), 3 and 4 = "consumer warpgroup w may issue its wgmmas" (ping-pong).
inline constexpr int kSchedulerBarrier = 3;
// Consumer warps that release a stage (one arrival each).
inline constexpr int kConsumerWarps = 8;

template <int kHeadDim>
struct SmemLayout {
  using Geo = TileGeometry<kHeadDim>;
  static constexpr int kBarrierBytes = 256;
  // Q, K[stages], V[stages], barriers, plus slack to align the base to the 1024-byte swizzle
  // atom (d = 128, 3 stages: 225.25 KiB of the 227 KiB a block may have).
  static constexpr int SmemBytes(int stages) {
    return (1 + 2 * stages) * Geo::kTileBytes + kBarrierBytes + 1024;
  }
};

// Producer copies: 128 threads, each copying one 16-byte chunk column of kPasses rows of a
// 128-row tile. Row sources (token position, or -1 for a zero-filled row) are looked up once per
// tile, one row per lane, and handed to the copying threads by warp shuffles: the 32 lanes of a
// warp hold exactly the 32 rows that warp copies.
template <int kHeadDim>
struct ProducerLoader {
  static constexpr int kChunksPerRow = kHeadDim / 8;                     // 16 or 8
  static constexpr int kRowsPerPass = kProducerThreads / kChunksPerRow;  // 8 or 16
  static constexpr int kPasses = kTileKeys / kRowsPerPass;               // 16 or 8
  static constexpr int kWarpRowsPerPass = 32 / kChunksPerRow;            // 2 or 4
  static_assert(kRowsPerPass % 8 == 0, "the swizzle phase must repeat every pass");

  int32_t lane;
  int32_t chunk;
  int32_t my_row;        // tile row whose source this lane looks up
  uint32_t smem_offset;  // swizzled byte offset of (first row, chunk) inside a tile

  __device__ __forceinline__ explicit ProducerLoader(int producer_tid) {
    using Geo = TileGeometry<kHeadDim>;
    lane = producer_tid % 32;
    const int warp = producer_tid / 32;
    const int row0 = producer_tid / kChunksPerRow;
    chunk = producer_tid % kChunksPerRow;
    my_row = (lane / kWarpRowsPerPass) * kRowsPerPass + warp * kWarpRowsPerPass +
             lane % kWarpRowsPerPass;
    const int panel = chunk / 8;
    const int chunk_in_panel = chunk % 8;
    smem_offset =
        panel * Geo::kPanelBytes + row0 * kPanelRowBytes + ((chunk_in_panel ^ (row0 % 8)) << 4);
  }

  // Source token of my_row in a contiguous run [first, first + n_valid).
  __device__ __forceinline__ int32_t ContiguousSource(int32_t first, int32_t n_valid) const {
    return my_row < n_valid ? first + my_row : -1;
  }
  __device__ __forceinline__ int32_t Source(const KeyTile& tile) const {
    if (my_row >= tile.n_valid) return -1;
    return tile.positions != nullptr ? __ldg(tile.positions + my_row) : tile.first + my_row;
  }

  // Copies the rows whose sources the warp's lanes hold (`my_source`) into a tile.
  template <typename Elem>
  __device__ __forceinline__ void Copy(uint32_t tile, const Elem* base, int64_t token_stride,
                                       int32_t my_source) const {
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int32_t source =
          __shfl_sync(0xffffffffu, my_source, pass * kWarpRowsPerPass + lane / kChunksPerRow);
      const bool valid = source >= 0;
      const Elem* src = base + (valid ? source * token_stride : 0) + chunk * 8;
      CpAsync16(tile + smem_offset + pass * kRowsPerPass * kPanelRowBytes, src, valid);
    }
  }
};

// (query tile, head) of a block; see the file comment for the two orders.
struct WorkItem {
  int32_t tile_index;
  int32_t head;
};

__host__ __device__ __forceinline__ WorkItem DecodeWorkItem(int64_t linear, int32_t num_tiles,
                                                            int32_t num_q_heads,
                                                            int32_t tiles_per_chunk) {
  WorkItem item;
  if (tiles_per_chunk <= 0) {
    item.tile_index = static_cast<int32_t>(linear / num_q_heads);
    item.head = static_cast<int32_t>(linear % num_q_heads);
    return item;
  }
  const int64_t chunk_blocks = static_cast<int64_t>(tiles_per_chunk) * num_q_heads;
  const int64_t chunk = linear / chunk_blocks;
  const int32_t in_chunk = static_cast<int32_t>(linear - chunk * chunk_blocks);
  const int32_t first_tile = static_cast<int32_t>(chunk * tiles_per_chunk);
  const int32_t left = num_tiles - first_tile;
  const int32_t chunk_tiles = left < tiles_per_chunk ? left : tiles_per_chunk;  // last: short
  item.head = in_chunk / chunk_tiles;
  item.tile_index = first_tile + in_chunk % chunk_tiles;
  return item;
}

// Whether key tile `tile` is a whole tile of a contiguous key range of a batch with K/V tensor
// maps, copied in bulk (one TMA copy per 64-column panel). Producer and consumers decide alike.
// (The producer also bulk-copies whole gathered tiles whose positions happen to be consecutive;
// the consumers treat those as row copies, which only costs them a proxy fence.)
__device__ __forceinline__ bool IsBulkTile(const KvTensorMaps& maps, const KeyTile& tile) {
  static_assert(kTileKeys == kBulkTileKeys, "one key tile = one bulk copy");
  return maps.enabled != 0 && tile.positions == nullptr && tile.n_valid == kTileKeys;
}

template <typename Elem, int kHeadDim, bool kSparse, int kStages>
__global__ void __launch_bounds__(kThreads, 1)
    AttentionKernel(const __grid_constant__ AttentionParams params,
                    const __grid_constant__ KvTensorMaps maps, const int32_t tiles_per_chunk) {
#if ANCHOR_ATTENTION_HAS_WGMMA
  static_assert(kStages >= 2 && kStages <= 3, "2 or 3 stages");
  using Geo = TileGeometry<kHeadDim>;
  constexpr int kOutRegs = Geo::kOutRegs;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem_base = (SmemAddress(smem_raw) + 1023u) & ~1023u;
  const uint32_t q_smem = smem_base;
  auto k_smem = [&](int stage) { return smem_base + (1 + stage) * Geo::kTileBytes; };
  auto v_smem = [&](int stage) { return smem_base + (1 + kStages + stage) * Geo::kTileBytes; };
  const uint32_t barriers = smem_base + (1 + 2 * kStages) * Geo::kTileBytes;
  const uint32_t q_full = barriers;
  auto k_full = [&](int stage) { return barriers + 8 * (1 + stage); };
  auto v_full = [&](int stage) { return barriers + 8 * (1 + kStages + stage); };
  auto k_empty = [&](int stage) { return barriers + 8 * (1 + 2 * kStages + stage); };
  auto v_empty = [&](int stage) { return barriers + 8 * (1 + 3 * kStages + stage); };

  const int tid = threadIdx.x;
  if (tid == 0) {
    MbarrierInit(q_full, kProducerThreads);
#pragma unroll
    for (int stage = 0; stage < kStages; ++stage) {
      MbarrierInit(k_full(stage), kProducerThreads);
      MbarrierInit(v_full(stage), kProducerThreads);
      MbarrierInit(k_empty(stage), kConsumerWarps);
      MbarrierInit(v_empty(stage), kConsumerWarps);
    }
    FenceMbarrierInit();
  }
  __syncthreads();

  const WorkItem work = DecodeWorkItem(static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x,
                                       params.num_tiles, params.num_q_heads, tiles_per_chunk);
  const int head = work.head;
  const QueryTile qt = params.tiles[work.tile_index];
  const SeqDesc seq = params.seqs[qt.seq];
  const int q_start = qt.q_start;
  const KeyPlan plan = MakeKeyPlan<kSparse>(params, qt, seq, head);
  const int num_key_tiles = plan.num_tiles;

  if (tid < kProducerThreads) {
    // ------------------------------------------------------------------ producer warpgroup
    SetMaxRegistersDecrease<kProducerRegisters>();
    const int kv_head = head / (params.num_q_heads / params.num_kv_heads);
    const Elem* q_base =
        static_cast<const Elem*>(params.q) + seq.q_offset + head * seq.q_head_stride;
    const Elem* k_base =
        static_cast<const Elem*>(params.k) + seq.kv_offset + kv_head * seq.kv_head_stride;
    const Elem* v_base =
        static_cast<const Elem*>(params.v) + seq.kv_offset + kv_head * seq.kv_head_stride;
    const ProducerLoader<kHeadDim> loader(tid);
    const int32_t token_base =
        KvMapTokenBase(maps, params.kv_tensor, seq.kv_offset, seq.kv_token_stride);
    // Fills a K or V stage with a key tile: bulk from key `bulk_first` (>= 0; thread 0 copies,
    // the others only arrive) or row by row from `my_source`.
    auto fill = [&](uint32_t stage_smem, uint32_t full, const CUtensorMap* map, const Elem* base,
                    int32_t bulk_first, int32_t my_source) {
      if (bulk_first >= 0) {
        static_assert(Geo::kTileBytes == Geo::kPanels * kBulkTileKeys * 128, "bulk tile bytes");
        BulkFillKeyTile<Geo::kPanels>(tid, stage_smem, map, maps.token_dim, full,
                                      token_base + bulk_first, kv_head);
      } else {
        loader.Copy(stage_smem, base, seq.kv_token_stride, my_source);
        CpAsyncMbarrierArrive(full);
      }
    };

    loader.Copy(q_smem, q_base, seq.q_token_stride, loader.ContiguousSource(q_start, qt.q_len));
    CpAsyncMbarrierArrive(q_full);
    // Order: K_0, then K_t and V_{t-1} (what consumer iteration t needs), then V_last. A stage
    // is refilled once both consumer warpgroups released the tile kStages earlier.
    // Tile t - 1 (for V_{t-1}): its first key if bulk, else -1; my_row's source if not.
    int32_t previous_bulk_first = -1;
    int32_t previous_source = -1;
    for (int t = 0; t <= num_key_tiles; ++t) {
      int32_t bulk_first = -1;
      int32_t source = -1;
      if (t < num_key_tiles) {
        const KeyTile tile = plan.Tile(t, q_start);
        if (IsBulkTile(maps, tile)) {
          bulk_first = tile.first;
        } else {
          source = loader.Source(tile);  // look up before waiting
          // A whole gathered tile of 128 consecutive positions (sorted, distinct): one range.
          if (maps.enabled != 0 && tile.positions != nullptr && tile.n_valid == kTileKeys) {
            const int32_t first = __ldg(tile.positions);
            if (__ldg(tile.positions + kTileKeys - 1) - first == kTileKeys - 1) bulk_first = first;
          }
        }
        const int stage = t % kStages;
        if (t >= kStages) MbarrierWait(k_empty(stage), ((t / kStages) - 1) & 1);
        fill(k_smem(stage), k_full(stage), &maps.k, k_base, bulk_first, source);
      }
      if (t > 0) {
        const int u = t - 1;
        const int stage = u % kStages;
        if (u >= kStages) MbarrierWait(v_empty(stage), ((u / kStages) - 1) & 1);
        fill(v_smem(stage), v_full(stage), &maps.v, v_base, previous_bulk_first, previous_source);
      }
      previous_bulk_first = bulk_first;
      previous_source = source;
    }
    CpAsyncWaitAllUngrouped();
  } else {
    // ------------------------------------------------------------------ consumer warpgroups
    SetMaxRegistersIncrease<kConsumerRegisters>();
    const int warpgroup = tid / 128 - 1;  // 0 or 1: query rows 64 * warpgroup ..
    const int thread_in_group = tid % 128;
    const int lane = tid % 32;
    const int warp_in_group = thread_in_group / 32;
    const float scale_log2 = params.softmax_scale * 1.4426950408889634f;
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
    // Waits until the use-th fill of a stage has landed. Row copies write through the generic
    // proxy and the wgmmas read through the async proxy: a wait for one is followed by a proxy
    // fence (bulk copies write through the async proxy and need none).
    auto wait_full = [&](uint32_t barrier, int use) { MbarrierWait(barrier, use & 1); };
    // One arrival per warp once its part of the wgmmas that read the stage has completed.
    auto release = [&](uint32_t barrier) {
      if (lane == 0) MbarrierArrive(barrier);
    };
    const int my_turn = kSchedulerBarrier + warpgroup;
    const int other_turn = kSchedulerBarrier + 1 - warpgroup;

    MbarrierWait(q_full, 0);
    if (num_key_tiles > 0) {
      // Tile 0: S_0 = Q K_0^T and its softmax (both warpgroups at once, as in FA3). The fence
      // also covers Q's row copies.
      wait_full(k_full(0), 0);
      FenceProxyAsync();
      WgmmaFence();
      issue_qk(k_smem(0));
      WgmmaCommit();
      WgmmaWait<0>();
      PinRegisters(s);
      release(k_empty(0));
      const KeyTile first_tile = plan.Tile(0, q_start);
      bool previous_bulk = IsBulkTile(maps, first_tile);  // tile t - 1 (V_{t-1}) came in bulk
      softmax(first_tile);
      ConvertP<Elem>(s, p);
      // Warpgroup 0 issues first. Each warpgroup waits for its turn before issuing an
      // iteration's wgmmas and passes the turn on after issuing; the counts match exactly
      // (warpgroup 1 skips the pass after its last iteration).
      if (warpgroup == 1 && num_key_tiles > 1) NamedBarrierArrive(kSchedulerBarrier, 256);

      // Steady state: S_t = Q K_t^T and O += P_{t-1} V_{t-1} in flight together; the softmax
      // of tile t overlaps the PV product and the other warpgroup's wgmmas.
      for (int t = 1; t < num_key_tiles; ++t) {
        const int k_stage = t % kStages;
        const int v_stage = (t - 1) % kStages;
        const KeyTile tile = plan.Tile(t, q_start);
        const bool bulk = IsBulkTile(maps, tile);
        wait_full(k_full(k_stage), t / kStages);
        wait_full(v_full(v_stage), (t - 1) / kStages);
        if (!bulk || !previous_bulk) FenceProxyAsync();
        NamedBarrierSync(my_turn, 256);
        WgmmaFence();
        issue_qk(k_smem(k_stage));
        WgmmaCommit();
        issue_pv(v_smem(v_stage));
        WgmmaCommit();
        if (warpgroup == 0 || t + 1 < num_key_tiles) NamedBarrierArrive(other_turn, 256);
        WgmmaWait<1>();
        PinRegisters(s);
        release(k_empty(k_stage));
        softmax(tile);
        WgmmaWait<0>();
        PinRegisters(o);
        PinRegisters(p);
        release(v_empty(v_stage));
        RescaleO(o, alpha);
        ConvertP<Elem>(s, p);
        previous_bulk = bulk;
      }

      // Last PV product.
      const int v_stage = (num_key_tiles - 1) % kStages;
      wait_full(v_full(v_stage), (num_key_tiles - 1) / kStages);
      if (!previous_bulk) FenceProxyAsync();
      WgmmaFence();
      issue_pv(v_smem(v_stage));
      WgmmaCommit();
      WgmmaWait<0>();
      PinRegisters(o);
      release(v_empty(v_stage));
    }

    StoreOutputTile<Elem, kHeadDim>(params, seq, q_start, qt.q_len, head, q_smem, warpgroup,
                                    thread_in_group, lane, row_local, row0, o, row_max, row_sum);
  }
#endif  // ANCHOR_ATTENTION_HAS_WGMMA
}

// K/V ring depth of both modes: the random stripe gathers of sparse mode need the deeper ring,
// and dense mode is no slower with it (bench/RESULTS.md). 225.25 KiB of shared memory at d = 128.
inline constexpr int kRingStages = 3;
// Block order: consecutive blocks walk this many query tiles of one head before the next head,
// so that the CTAs resident together share stripe lists and K/V rows in L2.
inline constexpr int32_t kTilesPerChunk = 16;

// Host side: launches one instantiation. Instantiated once per (dtype, head_dim) in
// attention_<dtype>_d<head_dim>.cu.
template <typename Elem, int kHeadDim>
cudaError_t LaunchAttentionTyped(const AttentionParams& params, const KvTensorMaps& maps,
                                 cudaStream_t stream) {
  if (params.num_tiles == 0) return cudaSuccess;
  auto launch = [&](auto* kernel, int smem_bytes) {
    cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (error != cudaSuccess) return error;
    const dim3 grid(static_cast<unsigned>(params.num_tiles),
                    static_cast<unsigned>(params.num_q_heads));
    kernel<<<grid, kThreads, smem_bytes, stream>>>(params, maps, kTilesPerChunk);
    return cudaGetLastError();
  };
  constexpr int kSmemBytes = SmemLayout<kHeadDim>::SmemBytes(kRingStages);
  if (params.sparse) return launch(AttentionKernel<Elem, kHeadDim, true, kRingStages>, kSmemBytes);
  return launch(AttentionKernel<Elem, kHeadDim, false, kRingStages>, kSmemBytes);
}

}  // namespace anchorserve::cuda::attention_detail
