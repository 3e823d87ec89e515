#include "tests/test_util/mass_check.h"

#include <cmath>

namespace anchorserve {

int64_t KeysNearThreshold(const std::vector<double>& margins, double theta) {
  int64_t near = 0;
  for (double margin : margins) near += std::fabs(margin + theta) < kMassMarginSlack;
  return near;
}

::testing::AssertionResult ValidMassChoice(const AnchorConfig& config, float theta,
                                           const std::vector<double>& estimate,
                                           const std::vector<int64_t>& kept_keys,
                                           const std::vector<double>& margins) {
  const double p = config.mass_target;
  const double cap = config.mass_density_cap * static_cast<double>(margins.size());
  // The first level the reference's estimate reaches (or nearly reaches) the target.
  auto reaches = [&](int k) { return estimate[k] >= p - kMassEstimateSlack; };
  auto clearly_reaches = [&](int k) { return estimate[k] >= p + kMassEstimateSlack; };
  if (p >= 1.0) {
    if (std::isinf(theta) && theta > 0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "p = 1 must keep every candidate, got theta " << theta;
  }
  if (std::isinf(theta) && theta > 0) {
    // Everything kept: the target is out of the grid's reach, or the first level that reaches
    // it keeps more than the cap allows.
    if (!clearly_reaches(kMassThetaBins)) return ::testing::AssertionSuccess();
    for (int k = 0; k <= kMassThetaBins; ++k) {
      if (!reaches(k)) continue;
      const double near = static_cast<double>(KeysNearThreshold(margins, MassThetaAt(config, k)));
      if (static_cast<double>(kept_keys[k]) + near > cap) return ::testing::AssertionSuccess();
      if (clearly_reaches(k)) break;
    }
    return ::testing::AssertionFailure()
           << "kept every candidate although a grid level reaches " << p << " within the cap";
  }
  const double steps = (static_cast<double>(theta) - config.mass_min_theta) / kMassThetaStep;
  const int k = static_cast<int>(std::lround(steps));
  if (k < 0 || k > kMassThetaBins || MassThetaAt(config, k) != theta) {
    return ::testing::AssertionFailure() << "theta " << theta << " is not on the grid";
  }
  if (!reaches(k)) {
    return ::testing::AssertionFailure()
           << "level " << k << " estimates " << estimate[k] << " < target " << p;
  }
  if (k > 0 && clearly_reaches(k - 1)) {
    return ::testing::AssertionFailure()
           << "level " << k - 1 << " already estimates " << estimate[k - 1] << " >= " << p;
  }
  const double near = static_cast<double>(KeysNearThreshold(margins, theta));
  if (static_cast<double>(kept_keys[k]) - near > cap) {
    return ::testing::AssertionFailure()
           << "level " << k << " keeps " << kept_keys[k] << " keys, over the cap " << cap;
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult KeptKeysMatchTheta(float theta, int64_t cand_begin,
                                              const std::vector<double>& margins,
                                              const std::vector<int64_t>& kept) {
  std::vector<bool> in_backend(margins.size(), false);
  for (int64_t key : kept) {
    if (key < cand_begin || key - cand_begin >= static_cast<int64_t>(margins.size())) {
      return ::testing::AssertionFailure() << "key " << key << " is not a candidate";
    }
    in_backend[key - cand_begin] = true;
  }
  for (size_t j = 0; j < margins.size(); ++j) {
    const double margin = margins[j] + static_cast<double>(theta);
    if (in_backend[j] != (margin >= 0) && !(std::fabs(margin) < kMassMarginSlack)) {
      return ::testing::AssertionFailure()
             << "key " << cand_begin + static_cast<int64_t>(j) << " kept " << in_backend[j]
             << " with margin " << margin << " over theta " << theta;
    }
  }
  return ::testing::AssertionSuccess();
}

}  // namespace anchorserve
