// Tensor maps (TMA descriptors) of a batch's K and V, for kernels that copy whole 128-key tiles
// into 128-byte-swizzled shared memory with one bulk tensor copy per 64-element panel instead of
// 16-byte row pieces from every producer thread. Built on the host per launch from
// KvTensorShape (attention_params.h); passed to kernels as a __grid_constant__ parameter.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "kernels/cuda/attention_params.h"

#if defined(__CUDACC__)
#include "kernels/cuda/ptx.cuh"
#endif

namespace anchorserve::cuda {

// Dimension 0 is d (boxes of 64 elements, 128-byte swizzle: the shared tiles' layout);
// dimensions 1 and 2 are the token (box of 128) and the KV head (box of 1), in the order of
// their strides. enabled = 0: no maps; kernels copy row by row.
struct KvTensorMaps {
  CUtensorMap k;
  CUtensorMap v;
  int32_t enabled;
  int32_t token_dim;  // 1 or 2
};

inline constexpr int32_t kBulkTileKeys = 128;  // keys of one bulk tile copy

// Maps of `k` and `v` (v may be null: K only) as `shape` describes them. enabled = 0 when there
// is no shared tensor (shape.num_tokens == 0), the driver has no tensor-map encoder, or the
// shape is outside what a tensor map addresses; that is never an error, only slower.
KvTensorMaps BuildKvTensorMaps(ElemType type, int32_t head_dim, int32_t num_kv_heads,
                               const KvTensorShape& shape, const void* k, const void* v);

#if defined(__CUDACC__)
// Issues the bulk copy of keys [token, token + 128) of KV head `kv_head` into the shared tile at
// `dst` (kPanels panels of [128 rows][128 bytes], 1024-byte aligned); the bytes complete on
// `full`, whose arrival with the expected byte count the caller makes first.
template <int kPanels>
__device__ __forceinline__ void TmaLoadKeyTile(uint32_t dst, const CUtensorMap* map,
                                               int32_t token_dim, uint32_t full, int32_t token,
                                               int32_t kv_head) {
  constexpr uint32_t kPanelBytes = kBulkTileKeys * 128;
  const int32_t c1 = token_dim == 1 ? token : kv_head;
  const int32_t c2 = token_dim == 1 ? kv_head : token;
#pragma unroll
  for (int panel = 0; panel < kPanels; ++panel) {
    ptx::TmaLoad3d(dst + panel * kPanelBytes, map, full, 64 * panel, c1, c2);
  }
}

// A producer warpgroup's part in a bulk tile fill: thread 0 arrives on `full` expecting the
// tile's bytes and issues the copy; the other producer threads only arrive (the barrier counts
// every producer thread, as it does for row copies).
template <int kPanels>
__device__ __forceinline__ void BulkFillKeyTile(int producer_thread, uint32_t dst,
                                                const CUtensorMap* map, int32_t token_dim,
                                                uint32_t full, int32_t token, int32_t kv_head) {
  if (producer_thread == 0) {
    ptx::MbarrierArriveExpectTx(full, kPanels * kBulkTileKeys * 128);
    TmaLoadKeyTile<kPanels>(dst, map, token_dim, full, token, kv_head);
  } else {
    ptx::MbarrierArrive(full);
  }
}

// Token coordinate, in the K/V tensor maps, of key 0 of the sequence at `kv_offset`.
__device__ __forceinline__ int32_t KvMapTokenBase(const KvTensorMaps& maps,
                                                  const KvTensorShape& shape, int64_t kv_offset,
                                                  int64_t kv_token_stride) {
  return maps.enabled != 0 ? static_cast<int32_t>((kv_offset - shape.base_offset) / kv_token_stride)
                           : 0;
}
#endif

}  // namespace anchorserve::cuda
