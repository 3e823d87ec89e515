// Mass-target selection (spec: docs/anchorattention.md section 8), after the scoring kernels
// have graded every candidate by level and summed the sampled rows' weights per level: each
// (group, head) picks the smallest level whose estimated kept mass
//   F(k) = sum_r n_r (lambda_r + sum_{level <= k} w_r) / (lambda_r + sum_{C_g} w_r) / sum_r n_r
// reaches the target, then the bitmask of its candidates is written for compaction.
#include <cmath>
#include <cstdint>

#include "kernels/cuda/identification.h"
#include "kernels/cuda/identification_common.cuh"

namespace anchorserve::cuda {
namespace {

using id_detail::kFullMask;

__device__ __forceinline__ double WarpSum(double x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// One warp per (batch group, query head); lane r holds sampled row r (pooled_rows == 16).
__global__ void __launch_bounds__(32) ChooseLevelKernel(const IdentificationParams p) {
  const int64_t list = int64_t{blockIdx.x} * p.num_q_heads + blockIdx.y;
  const IdGroup group = p.groups[blockIdx.x];
  const int candidates = group.cand_end - group.cand_begin;
  if (candidates <= 0) return;
  const int lane = threadIdx.x;
  const int64_t slot = list * p.pooled_rows + lane;
  const bool has_row = lane < p.geometry.step && lane < p.pooled_rows;
  const double rows = has_row ? p.blocks[int64_t{blockIdx.x} * p.geometry.step + lane].rows : 0.0;
  const double anchor = has_row ? p.mass.anchor_mass[slot] : 0.0;
  const double total = anchor + (has_row ? p.mass.candidate_mass[slot] : 0.0);
  const double weight = rows > 0 && total > 0 ? rows / total : 0.0;  // n_r / denominator
  const double all_rows = WarpSum(rows);
  const float* level_mass = p.mass.level_mass + slot * kMassGridLevels;
  const int32_t* level_keys = p.mass.level_keys + list * kMassGridLevels;

  MassChoiceRecord choice{kMassGridLevels, INFINITY, 1.0f, 0};
  if (p.mass.target < 1.0f && all_rows > 0) {  // p = 1 keeps every candidate
    double kept = anchor;
    int64_t kept_keys = 0;
    for (int k = 0; k < kMassGridLevels; ++k) {
      if (has_row) kept += level_mass[k];
      const double estimate = WarpSum(kept * weight) / all_rows;
      kept_keys += level_keys[k];
      if (estimate >= static_cast<double>(p.mass.target)) {
        if (static_cast<double>(kept_keys) <=
            static_cast<double>(p.mass.density_cap) * static_cast<double>(candidates)) {
          choice.level = k;
          choice.theta = p.mass.min_theta + static_cast<float>(k) * kMassGridStep;
          choice.estimate = static_cast<float>(estimate);
        }
        break;
      }
    }
  }
  if (lane == 0) p.mass.choice[list] = choice;
}

// Bitmask of the candidates at or below the chosen level. CTA = (batch group, query head);
// thread = one 32-key word.
constexpr int kBitsThreads = 256;

__global__ void __launch_bounds__(kBitsThreads) LevelBitsKernel(const IdentificationParams p) {
  const int64_t list = int64_t{blockIdx.x} * p.num_q_heads + blockIdx.y;
  const IdGroup group = p.groups[blockIdx.x];
  const int candidates = group.cand_end - group.cand_begin;
  if (candidates <= 0) return;
  const int level = p.mass.choice[list].level;
  const int64_t offset = p.lists.list_offset[list];
  const uint8_t* levels = p.mass.levels + offset;
  uint32_t* bits = p.bitmask + offset / 32;
  for (int w = threadIdx.x; w < (candidates + 31) / 32; w += kBitsThreads) {
    uint32_t word = 0;
    const uint4* chunk = reinterpret_cast<const uint4*>(levels + 32 * w);  // 32-aligned lists
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const uint4 bytes = chunk[half];
      const uint32_t parts[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        const int key_level = (parts[b / 4] >> (8 * (b % 4))) & 0xffu;
        word |= static_cast<uint32_t>(key_level <= level) << (16 * half + b);
      }
    }
    const int valid = candidates - 32 * w;
    if (valid < 32) word &= (1u << valid) - 1u;
    bits[w] = word;
  }
}

}  // namespace

LaunchResult LaunchMassSelection(const IdentificationParams& p, cudaStream_t stream) {
  const LaunchResult shape = id_detail::CheckShape(p);
  if (!shape.ok()) return shape;
  if (!p.mass.enabled) return LaunchResult::InvalidArgument("not a mass-target plan");
  if (p.pooled_rows != kPooledRowTile) {
    return LaunchResult::InvalidArgument("mass targets need step <= 16 (one row tile per head)");
  }
  if (p.num_groups == 0) return LaunchResult::Ok();
  const dim3 grid(p.num_groups, p.num_q_heads);
  ChooseLevelKernel<<<grid, 32, 0, stream>>>(p);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return LaunchResult::Cuda(error);
  LevelBitsKernel<<<grid, kBitsThreads, 0, stream>>>(p);
  return LaunchResult::Cuda(cudaGetLastError());
}

}  // namespace anchorserve::cuda
