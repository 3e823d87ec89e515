// Launchers of the stripe-identification kernels (identification.cu). Plain header: host C++
// includes it without nvcc. Each launcher returns the first CUDA error (launch or
// configuration); it does not synchronize.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/cuda/identification_types.h"

namespace anchorserve::cuda {

// Anchor x(i) = max over A(i) of scale * q_i.k_j (tensor cores, fp32 accumulation), then the
// pooled queries qbar_r and pooled anchors abar_r of every block (written as the 3-way split
// operand of the stripe kernel). params.anchor_kernel / stripe_kernel pick the kernels
// (kDefault: the production ones).
cudaError_t LaunchAnchorStage(const IdentificationParams& params, cudaStream_t stream);

// Scores every candidate key of every group against the pooled queries of each head
// (max_r(scale * qbar_r.k_j - abar_r) >= -theta, dot products exact up to fp32 accumulation),
// then compacts the selections into sorted per-(group, head) index lists and writes the counts.
// Needs the anchor stage's outputs.
cudaError_t LaunchStripeStage(const IdentificationParams& params, cudaStream_t stream);

// Only the pooling part of LaunchAnchorStage (per-tile sums -> qbar, abar and the split
// operand), e.g. to time it alone; needs the anchor kernel's per-tile sums.
cudaError_t LaunchPooling(const IdentificationParams& params, cudaStream_t stream);

// Only the compaction part of LaunchStripeStage (bitmask -> lists and counts), e.g. to time it
// alone; the bitmask must hold a stripe stage's bits.
cudaError_t LaunchStripeCompaction(const IdentificationParams& params, cudaStream_t stream);

// Per-(sequence, head) metrics (HeadStats) from the group table and the stripe counts. With
// `dense` (the dense kernel ran): N(N+1)/2 computed entries and no stripes, as the reference
// reports dense mode; the counts are not read.
cudaError_t LaunchHeadStats(const IdentificationParams& params, bool dense, cudaStream_t stream);

// Heads of one anchor CTA (query heads that share a KV head share its K tiles).
int AnchorHeadsPerCta(int num_q_heads, int num_kv_heads);

}  // namespace anchorserve::cuda
