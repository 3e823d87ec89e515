// Stripe compaction, the end of the stripe stage (spec: docs/anchorattention.md): the scoring
// kernels' bitmask -> sorted per-(group, head) index lists and their counts, by block prefix sums
// (deterministic).
#include <cstdint>

#include "kernels/cuda/identification.h"
#include "kernels/cuda/identification_common.cuh"

namespace anchorserve::cuda {
namespace {

using id_detail::kFullMask;

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

}  // namespace

LaunchResult LaunchStripeCompaction(const IdentificationParams& p, cudaStream_t stream) {
  const LaunchResult shape = id_detail::CheckShape(p);
  if (!shape.ok()) return shape;
  if (p.num_groups == 0) return LaunchResult::Ok();
  CompactKernel<<<dim3(p.num_groups, p.num_q_heads), kCompactThreads, 0, stream>>>(p);
  return LaunchResult::Cuda(cudaGetLastError());
}

}  // namespace anchorserve::cuda
