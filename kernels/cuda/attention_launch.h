// Host entry point of the attention compute kernels (dense causal and AnchorAttention sparse),
// plain C++: include it from .cc files. The kernel itself is in attention_kernel.cuh.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/cuda/attention_params.h"
#include "kernels/cuda/launch_result.h"

namespace anchorserve::cuda {

// Query rows per CTA: QueryTile::q_len must not exceed this.
inline constexpr int32_t kAttentionTileRows = 128;

// Runs attention for every (query tile, query head) of `params` on `stream`:
//   params.sparse == false: dense causal attention, keys [0, i] for row i;
//   params.sparse == true:  keys A(i) (anchor region of params.geometry) plus the stripes of the
//                           row's group (params.stripes), each key counted once.
// Writes params.out (input dtype) and, when non-null, params.maybe_lse (natural log).
// Supported: bf16/fp16, head_dim 64/128, Hq % Hkv == 0, compute capability 9.0 (sm_90a code).
// Preconditions the launcher cannot check (device memory): every SeqDesc offset and stride is a
// multiple of 8 elements (16-byte rows), params.kv_tensor is zeros or describes the SeqDescs
// (UniformKvTensor), stripe positions lie in [n_init*G, (g-n_loc+1)*G) of
// their sequence, tiles never straddle a group and have 1 <= q_len <= kAttentionTileRows.
// Returns the failed precondition for unsupported or inconsistent arguments (InvalidArgument)
// and on a GPU other than sm_90 (UnsupportedDevice), otherwise the launch's CUDA error.
// Asynchronous: no synchronisation.
LaunchResult LaunchAttention(const AttentionParams& params, cudaStream_t stream);

// The one strided K/V tensor that the sequences of a batch share (KvTensorShape), or zeros when
// their K/V layouts differ (e.g. head-major sequences of different lengths).
inline KvTensorShape UniformKvTensor(const std::vector<SeqDesc>& seqs) {
  KvTensorShape shape{0, 0, 0, 0};
  if (seqs.empty() || seqs[0].kv_token_stride <= 0 || seqs[0].kv_head_stride <= 0) return shape;
  const int64_t token_stride = seqs[0].kv_token_stride;
  const int64_t base_offset = seqs[0].kv_offset % token_stride;
  int64_t num_tokens = 0;
  for (const SeqDesc& seq : seqs) {
    if (seq.kv_token_stride != token_stride || seq.kv_head_stride != seqs[0].kv_head_stride ||
        seq.kv_offset < base_offset || seq.kv_offset % token_stride != base_offset) {
      return shape;
    }
    num_tokens = std::max(num_tokens, (seq.kv_offset - base_offset) / token_stride + seq.seq_len);
  }
  shape.base_offset = base_offset;
  shape.num_tokens = num_tokens;
  shape.token_stride = token_stride;
  shape.head_stride = seqs[0].kv_head_stride;
  return shape;
}

// Query tiles of at most kAttentionTileRows rows that never straddle a group of `group_size`
// rows, for the sequences of `seq_lens` (QueryTile::seq = index in seq_lens). Listed with the
// largest end row first: causal work grows with it, so long tiles start in the first wave.
inline std::vector<QueryTile> BuildQueryTiles(const std::vector<int32_t>& seq_lens,
                                              int32_t group_size) {
  std::vector<QueryTile> tiles;
  for (int32_t seq = 0; seq < static_cast<int32_t>(seq_lens.size()); ++seq) {
    for (int32_t start = 0; start < seq_lens[seq];) {
      const int32_t group = group_size > 0 ? start / group_size : 0;
      const int64_t group_end =
          group_size > 0 ? int64_t{group + 1} * group_size : int64_t{seq_lens[seq]};
      const int32_t end = static_cast<int32_t>(
          std::min<int64_t>({int64_t{start} + kAttentionTileRows, group_end, seq_lens[seq]}));
      tiles.push_back(QueryTile{seq, start, end - start, group});
      start = end;
    }
  }
  std::stable_sort(tiles.begin(), tiles.end(), [](const QueryTile& a, const QueryTile& b) {
    return a.q_start + a.q_len > b.q_start + b.q_len;
  });
  return tiles;
}

}  // namespace anchorserve::cuda
