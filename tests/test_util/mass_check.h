// Checks of a backend's mass-target choices (docs/anchorattention.md section 8) against the fp64
// reference, shared by the CPU and CUDA backend tests.
#pragma once

#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention_types.h"

namespace anchorserve {

// fp32 identification may place a key whose fp64 margin is this close to a grid threshold on
// the other side of it (nats).
inline constexpr double kMassMarginSlack = 2e-3;
// A backend's estimate comes from fp32 gaps: each exp(gap) carries a relative error of about
// the margin slack, and keys within the slack of a grid threshold may sit one level apart.
inline constexpr double kMassEstimateSlack = 5e-3;

// Candidates whose fp64 pooled margin lies within the slack of -theta.
int64_t KeysNearThreshold(const std::vector<double>& margins, double theta);

// Whether `theta` (a backend's choice for one group and head) is a choice the spec allows,
// judged by the reference's fp64 estimate and kept-key count at every grid level and its
// pooled margins (ReferenceResult::mass_estimate, mass_kept_keys, pooled_margins).
::testing::AssertionResult ValidMassChoice(const AnchorConfig& config, float theta,
                                           const std::vector<double>& estimate,
                                           const std::vector<int64_t>& kept_keys,
                                           const std::vector<double>& margins);

// Whether the kept keys (`kept`, sorted, inside C_g) are the candidates with fp64 pooled margin
// >= -theta, up to keys within the slack of the threshold.
::testing::AssertionResult KeptKeysMatchTheta(float theta, int64_t cand_begin,
                                              const std::vector<double>& margins,
                                              const std::vector<int64_t>& kept);

}  // namespace anchorserve
