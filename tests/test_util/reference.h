// Naive fp64 evaluation of the AnchorAttention spec (docs/anchorattention.md) with the
// exact set-union semantics: the yardstick every backend is tested against.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/attention_types.h"

namespace anchorserve {

struct ReferenceResult {
  std::vector<double> out;  // [Hq, N, d] head-major, fp64
  std::vector<double> lse;  // [Hq, N] natural log of sum_j exp(s_ij) over the computed keys
  std::vector<HeadStats> head_stats;  // [Hq]
  int64_t num_groups = 0;             // ceil(N / G)
  // [Hq * num_groups] sorted selected key indices S_g (index h * num_groups + g).
  std::vector<std::vector<int64_t>> stripes;
  // [Hq * num_groups][|C_g|]: max_r(scale * qbar_r . k_j - abar_r) + theta for j in C_g in
  // increasing order (>= 0 means selected). Empty lists for groups without candidates.
  std::vector<std::vector<double>> stripe_margins;
  // [Hq * num_groups] the threshold each group used: config.theta, or in mass-target mode the
  // one chosen here (+inf when the group keeps every candidate); NaN where nothing is identified.
  std::vector<double> group_theta;
  // [Hq * num_groups][|C_g|]: the pooled margins max_r(scale * qbar_r . k_j - abar_r) alone
  // (stripe_margins without the threshold).
  std::vector<std::vector<double>> pooled_margins;
  // Mass-target mode only, [Hq * num_groups][kMassThetaBins + 1] (empty lists for groups without
  // candidates): the estimated kept mass (section 8) and the number of candidates kept at each
  // grid threshold MassThetaAt(config, k).
  std::vector<std::vector<double>> mass_estimate;
  std::vector<std::vector<int64_t>> mass_kept_keys;
};

// Rows and key ranges of query group g (sequence length n) as the spec defines them: rows
// [row_begin, row_end), initial keys [0, init_end), local keys from local_begin (cut at each
// row i), stripe candidates C_g = [cand_begin, cand_end).
struct GroupRanges {
  int64_t row_begin, row_end, init_end, local_begin, cand_begin, cand_end;
};
GroupRanges GroupRangesOf(const AnchorConfig& config, int64_t n, int64_t g);

// Reads q/k/v as task.dtype / task.layout says and evaluates task.config in fp64 (set union of
// A(i) and S_g, each key once). In dense mode (config.IsDense(): mode DENSE or theta = +inf)
// every row attends to [0, i], stripes and margins are empty and head_stats count
// N(N+1)/2 computed entries and no stripes, as the backends report. In mass-target mode the
// margins are relative to each group's chosen threshold. Runs heads in parallel.
// The task must pass ValidateTask.
ReferenceResult ReferenceAttend(const AttentionTask& task);

// The same, but with the stripe sets given ([Hq * num_groups], any order) instead of identified;
// margins are still computed. Lets a test check a backend's output exactly even where its fp32
// selection legitimately differs from the fp64 one at the threshold.
ReferenceResult ReferenceAttendWithStripes(const AttentionTask& task,
                                           const std::vector<std::vector<int64_t>>& stripes);

}  // namespace anchorserve
