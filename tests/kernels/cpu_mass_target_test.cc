// Mass-target mode (docs/anchorattention.md section 8) of the CPU backend against the fp64
// reference: the threshold each (query head, group) picks, the keys it keeps, the outputs and
// the reported statistics.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention_types.h"
#include "kernels/cpu/cpu_attention.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cpu/tile_kernels.h"
#include "kernels/structured_inputs.h"
#include "tests/test_util/compare.h"
#include "tests/test_util/mass_check.h"
#include "tests/test_util/reference.h"

namespace anchorserve {
namespace {

struct MassCase {
  int64_t seq_len;
  int num_q_heads;
  int num_kv_heads;
  int head_dim;
  DType dtype;
  float mass_target;
  float density_cap = 1.0f;
  float min_theta = 0.0f;
  bool structured = true;
  uint64_t seed = 1;
  Layout layout = Layout::kTokenMajor;

  std::string Name() const {
    return absl::StrCat("N", seq_len, "_Hq", num_q_heads, "_Hkv", num_kv_heads, "_d", head_dim, "_",
                        std::string(DTypeName(dtype)), "_p", mass_target, "_cap", density_cap,
                        "_min", min_theta, structured ? "_structured" : "_random", "_seed", seed);
  }
};

void PrintTo(const MassCase& c, std::ostream* os) { *os << c.Name(); }

struct MassRun {
  HostQkv qkv;
  std::vector<uint8_t> out;
  std::vector<float> lse;
  AttentionTask task;
  std::vector<std::vector<int64_t>> stripes;
  std::vector<float> group_thetas;
};

// Runs the CPU backend on `c` into `run` (outputs poisoned with NaN first).
void RunCase(const MassCase& c, MassRun* run) {
  const AttentionShape shape{c.seq_len, c.num_q_heads, c.num_kv_heads, c.head_dim};
  if (c.structured) {
    StructuredInputOptions options;
    options.seed = c.seed;
    // Scaled down with the groups (G = 64 here instead of 2048).
    options.local_window = 32;
    options.needle_query_rows = 16;
    run->qkv = *GenerateStructuredQkv(shape, c.dtype, c.layout, options);
  } else {
    run->qkv = *GenerateRandomQkv(shape, c.dtype, c.layout, c.seed);
  }
  const size_t out_elements = static_cast<size_t>(c.seq_len) * c.num_q_heads * c.head_dim;
  run->out.resize(out_elements * ElementSize(c.dtype));
  FillWithNaN(run->out.data(), c.dtype, out_elements);
  run->lse.assign(static_cast<size_t>(c.seq_len) * c.num_q_heads,
                  std::numeric_limits<float>::quiet_NaN());
  run->task = AttentionTask{};
  BindInputs(run->qkv, &run->task);
  run->task.out = run->out.data();
  run->task.maybe_lse = run->lse.data();
  AnchorConfig& config = run->task.config;
  config.block_size = 16;
  config.step = 4;  // G = 64
  // Unused in mass-target mode; -inf would select no stripe at all if it were used.
  config.theta = -std::numeric_limits<float>::infinity();
  config.mass_target = c.mass_target;
  config.mass_density_cap = c.density_cap;
  config.mass_min_theta = c.min_theta;
  ASSERT_TRUE(ValidateTask(run->task).ok());
  cpu::ThreadPool pool(2);
  const absl::Status status = cpu::RunCpuAttention(&run->task, &pool, cpu::SelectTileKernels(),
                                                   &run->stripes, &run->group_thetas);
  ASSERT_TRUE(status.ok()) << status;
  ASSERT_TRUE(run->task.status.ok()) << run->task.status;
}

class CpuMassTargetTest : public ::testing::TestWithParam<MassCase> {};

TEST_P(CpuMassTargetTest, MatchesReference) {
  const MassCase& c = GetParam();
  MassRun run;
  RunCase(c, &run);
  if (HasFatalFailure()) return;
  const ReferenceResult ref = ReferenceAttend(run.task);
  ASSERT_EQ(run.group_thetas.size(), ref.group_theta.size());
  ASSERT_EQ(run.stripes.size(), ref.stripes.size());
  int64_t groups = 0, same_theta = 0, kept = 0, candidates = 0;
  for (size_t hg = 0; hg < ref.stripes.size(); ++hg) {
    const std::vector<double>& margins = ref.pooled_margins[hg];
    const int64_t h = static_cast<int64_t>(hg) / ref.num_groups;
    const int64_t g = static_cast<int64_t>(hg) % ref.num_groups;
    SCOPED_TRACE(absl::StrCat("head ", h, " group ", g));
    if (margins.empty()) {
      EXPECT_TRUE(run.stripes[hg].empty());
      EXPECT_TRUE(std::isnan(run.group_thetas[hg])) << run.group_thetas[hg];
      continue;
    }
    ++groups;
    const float theta = run.group_thetas[hg];
    same_theta += static_cast<double>(theta) == ref.group_theta[hg];
    EXPECT_TRUE(ValidMassChoice(run.task.config, theta, ref.mass_estimate[hg],
                                ref.mass_kept_keys[hg], margins));
    // The kept keys are exactly the candidates within the chosen threshold, up to fp32 rounding.
    const GroupRanges geo = GroupRangesOf(run.task.config, c.seq_len, g);
    EXPECT_TRUE(KeptKeysMatchTheta(theta, geo.cand_begin, margins, run.stripes[hg]));
    kept += static_cast<int64_t>(run.stripes[hg].size());
    candidates += static_cast<int64_t>(margins.size());
  }
  // Disagreements about the threshold itself are rare ties of the estimate with the target.
  EXPECT_GE(same_theta, groups * 9 / 10) << same_theta << " of " << groups;

  // Outputs, LSE and counts against the reference on the backend's own key sets.
  const ReferenceResult exact = ReferenceAttendWithStripes(run.task, run.stripes);
  const ErrorStats out_errors = CompareToReference(run.task, exact);
  EXPECT_TRUE(out_errors.ok()) << "out: " << out_errors.ToString();
  const ErrorStats lse_errors = CompareLseToReference(run.lse.data(), exact);
  EXPECT_TRUE(lse_errors.ok()) << "lse: " << lse_errors.ToString();
  for (int h = 0; h < c.num_q_heads; ++h) {
    SCOPED_TRACE(absl::StrCat("head ", h));
    const HeadStats& got = run.task.head_stats[h];
    EXPECT_EQ(got.computed_entries, exact.head_stats[h].computed_entries);
    EXPECT_EQ(got.stripe_entries, exact.head_stats[h].stripe_entries);
    EXPECT_EQ(got.mass_groups + got.mass_full_groups, got.stripe_groups);
    // The reference's own choices give its estimate; equal thresholds give equal estimates.
    const HeadStats& expected = ref.head_stats[h];
    if (got.mass_groups == expected.mass_groups &&
        got.mass_full_groups == expected.mass_full_groups &&
        got.mass_theta_sum == expected.mass_theta_sum) {
      EXPECT_NEAR(got.estimated_mass_sum, expected.estimated_mass_sum,
                  kMassEstimateSlack * static_cast<double>(c.seq_len));
      EXPECT_EQ(got.mass_theta_min, expected.mass_theta_min);
      EXPECT_EQ(got.mass_theta_max, expected.mass_theta_max);
    }
    EXPECT_GT(got.estimated_mass_sum, 0.0);
    EXPECT_LE(got.estimated_mass_sum, static_cast<double>(c.seq_len) * (1 + 1e-9));
  }
  RecordProperty("kept_fraction", absl::StrCat(candidates > 0 ? 1.0 * kept / candidates : -1));
}

std::vector<MassCase> MassCases() {
  std::vector<MassCase> cases;
  uint64_t seed = 300;
  for (float p : {0.5f, 0.9f, 0.95f, 0.99f, 1.0f}) {
    cases.push_back({700, 4, 1, 64, DType::kBf16, p});
    cases.back().seed = seed++;
  }
  // Longer: 40 groups, most with hundreds of candidates.
  cases.push_back({2600, 4, 2, 64, DType::kBf16, 0.95f});
  // Other dtypes, layouts, GQA ratios and head dims.
  cases.push_back({513, 2, 2, 128, DType::kFp16, 0.95f});
  cases.push_back({400, 8, 1, 32, DType::kFp32, 0.9f});
  cases.back().layout = Layout::kHeadMajor;
  // Random inputs: broad score distributions where most candidates carry some mass.
  cases.push_back({600, 2, 1, 64, DType::kFp32, 0.95f});
  cases.back().structured = false;
  // A density cap that many groups exceed, and a minimum threshold above and below zero.
  cases.push_back({700, 4, 1, 64, DType::kBf16, 0.95f});
  cases.back().density_cap = 0.05f;
  cases.push_back({700, 4, 1, 64, DType::kBf16, 0.9f});
  cases.back().min_theta = 3.0f;
  cases.push_back({700, 4, 1, 64, DType::kBf16, 0.9f});
  cases.back().min_theta = -2.0f;
  for (size_t i = 5; i < cases.size(); ++i) cases[i].seed = seed++;
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, CpuMassTargetTest, ::testing::ValuesIn(MassCases()),
                         [](const ::testing::TestParamInfo<MassCase>& info) {
                           std::string name = info.param.Name();
                           for (char& ch : name) {
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           }
                           return name;
                         });

// A higher target never keeps fewer keys: for each (head, group) the chosen level can only rise
// with p, because the estimate grows with the level.
TEST(CpuMassTargetMonotonicTest, HigherTargetKeepsSuperset) {
  std::vector<MassRun> runs(3);
  const float targets[] = {0.6f, 0.9f, 0.99f};
  for (int i = 0; i < 3; ++i) {
    MassCase c{900, 4, 1, 64, DType::kBf16, targets[i]};
    c.seed = 77;
    RunCase(c, &runs[i]);
    if (HasFatalFailure()) return;
  }
  int64_t grew = 0;
  for (int i = 1; i < 3; ++i) {
    for (size_t hg = 0; hg < runs[i].stripes.size(); ++hg) {
      const std::vector<int64_t>& low = runs[i - 1].stripes[hg];
      const std::vector<int64_t>& high = runs[i].stripes[hg];
      EXPECT_TRUE(std::includes(high.begin(), high.end(), low.begin(), low.end()))
          << "group " << hg << " p " << targets[i];
      grew += high.size() > low.size();
    }
  }
  EXPECT_GT(grew, 0) << "no group changed between targets: the case is trivial";
}

// Rows of groups without candidates count as fully kept, and p = 1 keeps every candidate of
// every group: the estimate is then exactly 1 for every head.
TEST(CpuMassTargetEdgeTest, ShortSequenceAndFullTarget) {
  MassRun short_run;
  RunCase({100, 2, 1, 64, DType::kFp32, 0.9f}, &short_run);  // < (n_init + n_loc) * G
  if (HasFatalFailure()) return;
  for (const HeadStats& stats : short_run.task.head_stats) {
    EXPECT_EQ(stats.estimated_mass_sum, 100.0);
    EXPECT_EQ(stats.mass_groups + stats.mass_full_groups, 0);
  }
  MassRun full;
  RunCase({500, 2, 1, 64, DType::kFp32, 1.0f}, &full);
  if (HasFatalFailure()) return;
  for (const HeadStats& stats : full.task.head_stats) {
    EXPECT_EQ(stats.estimated_mass_sum, 500.0);
    EXPECT_EQ(stats.mass_groups, 0);
    EXPECT_GT(stats.mass_full_groups, 0);
  }
}

TEST(MassTargetConfigTest, RejectsOutOfRangeValuesNamingTheField) {
  const struct {
    float target, cap, min_theta;
    const char* field;
  } bad[] = {
      {1.5f, 1.0f, 0.0f, "config.mass_target"},
      {-0.1f, 1.0f, 0.0f, "config.mass_target"},
      {NAN, 1.0f, 0.0f, "config.mass_target"},
      {0.9f, 0.0f, 0.0f, "config.mass_density_cap"},
      {0.9f, 1.5f, 0.0f, "config.mass_density_cap"},
      {0.9f, NAN, 0.0f, "config.mass_density_cap"},
      {0.9f, 1.0f, INFINITY, "config.mass_min_theta"},
      {0.9f, 1.0f, NAN, "config.mass_min_theta"},
  };
  for (const auto& b : bad) {
    AnchorConfig config;
    config.mass_target = b.target;
    config.mass_density_cap = b.cap;
    config.mass_min_theta = b.min_theta;
    const absl::Status status = ValidateAnchorConfig(config);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << b.field;
    EXPECT_NE(status.message().find(b.field), std::string::npos) << status;
  }
  AnchorConfig ok;
  ok.mass_target = 1.0f;
  ok.mass_density_cap = 0.5f;
  ok.mass_min_theta = -3.0f;
  EXPECT_TRUE(ValidateAnchorConfig(ok).ok());
}

// The grid level of a margin is consistent with the fp32 comparison it stands for.
TEST(MassTargetConfigTest, LevelMatchesThresholdComparison) {
  AnchorConfig config;
  config.mass_min_theta = 0.3f;
  for (float margin = 2.0f; margin > -45.0f; margin -= 0.0371f) {
    const int level = MassLevelOf(config, margin);
    if (level <= kMassThetaBins) {
      EXPECT_GE(margin, -MassThetaAt(config, level)) << margin;
    }
    if (level > 0) {
      EXPECT_LT(margin, -MassThetaAt(config, level - 1)) << margin;
    }
  }
  // Exactly on a threshold: kept by it.
  EXPECT_EQ(MassLevelOf(config, -MassThetaAt(config, 7)), 7);
  EXPECT_EQ(MassLevelOf(config, -std::numeric_limits<float>::infinity()), kMassThetaBins + 1);
  EXPECT_EQ(MassLevelOf(config, NAN), kMassThetaBins + 1);
}

}  // namespace
}  // namespace anchorserve
