// Launchers of the stripe-identification stages, one .cu file each (spec:
// docs/anchorattention.md). Plain header: host C++ includes it without nvcc. Each launcher
// returns the shape precondition of `params` that does not hold (InvalidArgument), or else the
// first CUDA error (launch or configuration); it does not synchronize.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/cuda/identification_types.h"
#include "kernels/cuda/launch_result.h"

namespace anchorserve::cuda {

// anchor_stage.cu: anchor x(i) = max over A(i) of scale * q_i.k_j (tensor cores, fp32
// accumulation), then LaunchPooling.
LaunchResult LaunchAnchorStage(const IdentificationParams& params, cudaStream_t stream);

// pooling.cu: the pooled queries qbar_r and pooled anchors abar_r of every block from the anchor
// kernel's per-tile sums, written as the 3-way split operand of the stripe kernels. Part of
// LaunchAnchorStage; on its own, e.g. to time it.
LaunchResult LaunchPooling(const IdentificationParams& params, cudaStream_t stream);

// stripe_scoring.cu: scores every candidate key of every group against the pooled queries of each
// head (max_r(scale * qbar_r.k_j - abar_r) >= -theta, dot products exact up to fp32
// accumulation) into the bitmask, then LaunchStripeCompaction. Needs the anchor stage's outputs.
// Mass-target plans instead grade the candidates by level, estimate each level's kept mass from
// the sampled rows and select with LaunchMassSelection.
LaunchResult LaunchStripeStage(const IdentificationParams& params, cudaStream_t stream);

// mass_selection.cu (mass-target plans, after the scoring kernels): per (group, head) the
// smallest grid level whose estimated kept mass reaches the target (spec section 8), then the
// bitmask of the candidates at or below it. Part of LaunchStripeStage.
LaunchResult LaunchMassSelection(const IdentificationParams& params, cudaStream_t stream);

// stripe_compaction.cu: bitmask -> sorted per-(group, head) index lists and counts. Part of
// LaunchStripeStage; on its own, e.g. to time it (the bitmask must hold a stripe stage's bits).
LaunchResult LaunchStripeCompaction(const IdentificationParams& params, cudaStream_t stream);

// head_stats.cu: per-(sequence, head) metrics (HeadStats) from the group table and the stripe
// counts. With `dense` (the dense kernel ran): N(N+1)/2 computed entries and no stripes, as the
// reference reports dense mode; the counts are not read.
LaunchResult LaunchHeadStats(const IdentificationParams& params, bool dense, cudaStream_t stream);

}  // namespace anchorserve::cuda
