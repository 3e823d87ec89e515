// Per-(sequence, query head) metrics of the spec (HeadStats: computed entries, stripe counts),
// reduced on the device so that a batch needs one device->host copy.
#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/identification.h"
#include "kernels/cuda/identification_common.cuh"

namespace anchorserve::cuda {
namespace {

using id_detail::kFullMask;

// Per-head metrics. CTA = (sequence, query head).
constexpr int kStatsThreads = 128;

__global__ void __launch_bounds__(kStatsThreads)
    HeadStatsKernel(const IdentificationParams p, bool dense) {
  constexpr int kWarps = kStatsThreads / 32;
  __shared__ long long shared[8][kWarps];
  __shared__ double shared_mass_sums[2][kWarps];
  __shared__ float shared_theta[2][kWarps];
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
  // Mass-target plans: chosen thresholds and estimated kept mass (rows without candidates: 1).
  long long mass_groups = 0, full_groups = 0;
  double theta_sum = 0, estimated_mass = 0;
  float theta_min = INFINITY, theta_max = -INFINITY;
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
    if (p.mass.enabled) {
      if (candidates <= 0) {
        estimated_mass += group.rows;
        continue;
      }
      const MassChoiceRecord choice = p.mass.choice[batch_group * p.num_q_heads + head];
      estimated_mass += static_cast<double>(group.rows) * choice.estimate;
      if (choice.level >= kMassGridLevels) {
        ++full_groups;
        continue;
      }
      ++mass_groups;
      theta_sum += choice.theta;
      theta_min = fminf(theta_min, choice.theta);
      theta_max = fmaxf(theta_max, choice.theta);
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
  double mass_sums[2] = {theta_sum, estimated_mass};
  long long mass_counts[2] = {mass_groups, full_groups};
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    for (int v = 0; v < 2; ++v) {
      mass_sums[v] += __shfl_xor_sync(kFullMask, mass_sums[v], offset);
      mass_counts[v] += __shfl_xor_sync(kFullMask, mass_counts[v], offset);
    }
    theta_min = fminf(theta_min, __shfl_xor_sync(kFullMask, theta_min, offset));
    theta_max = fmaxf(theta_max, __shfl_xor_sync(kFullMask, theta_max, offset));
  }
  if (lane == 0) {
    shared_mass_sums[0][warp] = mass_sums[0];
    shared_mass_sums[1][warp] = mass_sums[1];
    shared[6][warp] = mass_counts[0];
    shared[7][warp] = mass_counts[1];
    shared_theta[0][warp] = theta_min;
    shared_theta[1][warp] = theta_max;
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
    DeviceHeadStats stats{};
    for (int w = 0; w < kWarps; ++w) {
      stats.mass_theta_sum += shared_mass_sums[0][w];
      stats.estimated_mass_sum += shared_mass_sums[1][w];
      stats.mass_groups += shared[6][w];
      stats.mass_full_groups += shared[7][w];
      theta_min = fminf(theta_min, shared_theta[0][w]);
      theta_max = fmaxf(theta_max, shared_theta[1][w]);
    }
    if (stats.mass_groups > 0) {
      stats.mass_theta_min = theta_min;
      stats.mass_theta_max = theta_max;
    }
    stats.computed_entries = values[0] + values[1];
    stats.stripe_entries = values[1];
    stats.stripe_groups = values[2];
    stats.stripes_total = values[3];
    stats.stripes_min = values[2] > 0 ? values[4] : 0;
    stats.stripes_max = values[5];
    p.head_stats[int64_t{blockIdx.x} * p.num_q_heads + head] = stats;
  }
}

}  // namespace

LaunchResult LaunchHeadStats(const IdentificationParams& p, bool dense, cudaStream_t stream) {
  if (p.num_seqs == 0) return LaunchResult::Ok();
  HeadStatsKernel<<<dim3(p.num_seqs, p.num_q_heads), kStatsThreads, 0, stream>>>(p, dense);
  return LaunchResult::Cuda(cudaGetLastError());
}

}  // namespace anchorserve::cuda
