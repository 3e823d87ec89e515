// SummarizeHeads and ComputeRecall on cases worked out by hand.
#include "kernels/sparsity_stats.h"

#include <cmath>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/dtype.h"

namespace anchorserve {
namespace {

TEST(SummarizeHeadsTest, HandComputed) {
  // N = 10: 55 causal entries per head.
  HeadStats sparse;  // 3 groups with candidates holding 1, 2 and 4 stripes of 2 rows each
  sparse.computed_entries = 45;
  sparse.stripe_entries = 14;
  sparse.stripe_groups = 3;
  sparse.stripes_total = 7;
  sparse.stripes_min = 1;
  sparse.stripes_max = 4;
  HeadStats dense;
  dense.computed_entries = 55;
  HeadStats empty_stripes;  // groups with candidates but nothing selected
  empty_stripes.computed_entries = 31;
  empty_stripes.stripe_groups = 3;
  const std::vector<HeadStats> heads = {sparse, dense, empty_stripes};
  const RequestSummary summary = SummarizeHeads(10, heads);

  ASSERT_EQ(summary.heads.size(), 3u);
  EXPECT_DOUBLE_EQ(summary.heads[0].density, 45.0 / 55.0);
  EXPECT_DOUBLE_EQ(summary.heads[0].stripe_density, 14.0 / 55.0);
  EXPECT_EQ(summary.heads[0].stripes.min, 1);
  EXPECT_EQ(summary.heads[0].stripes.max, 4);
  EXPECT_DOUBLE_EQ(summary.heads[0].stripes.mean, 7.0 / 3.0);
  EXPECT_EQ(summary.heads[0].stripes.groups, 3);
  EXPECT_DOUBLE_EQ(summary.heads[1].density, 1.0);
  EXPECT_EQ(summary.heads[1].stripes.groups, 0);
  EXPECT_EQ(summary.heads[1].stripes.min, 0);
  EXPECT_DOUBLE_EQ(summary.heads[1].stripes.mean, 0.0);
  EXPECT_DOUBLE_EQ(summary.heads[2].density, 31.0 / 55.0);
  EXPECT_EQ(summary.heads[2].stripes.min, 0);
  EXPECT_EQ(summary.heads[2].stripes.max, 0);

  EXPECT_DOUBLE_EQ(summary.density, (45.0 + 55.0 + 31.0) / 165.0);
  EXPECT_DOUBLE_EQ(summary.stripe_density, 14.0 / 165.0);
  EXPECT_EQ(summary.stripes.groups, 6);
  EXPECT_EQ(summary.stripes.min, 0);  // the third head's groups
  EXPECT_EQ(summary.stripes.max, 4);
  EXPECT_DOUBLE_EQ(summary.stripes.mean, 7.0 / 6.0);
}

TEST(SummarizeHeadsTest, MinOverHeadsWithGroupsOnly) {
  HeadStats a;
  a.computed_entries = 3;
  a.stripe_groups = 1;
  a.stripes_total = 5;
  a.stripes_min = 5;
  a.stripes_max = 5;
  HeadStats b;  // no groups with candidates: must not pull the minimum to 0
  b.computed_entries = 3;
  const std::vector<HeadStats> heads = {b, a};
  const RequestSummary summary = SummarizeHeads(2, heads);
  EXPECT_EQ(summary.stripes.min, 5);
  EXPECT_EQ(summary.stripes.max, 5);
  EXPECT_DOUBLE_EQ(summary.stripes.mean, 5.0);
  EXPECT_DOUBLE_EQ(summary.density, 1.0);
}

TEST(SummarizeHeadsTest, MassBudget) {
  // N = 8. Head 0: 3 groups chose 2.5, 4.0 and 6.5 nats, 1 kept everything; estimated mass
  // 7.2 over 8 rows. Head 1: every group kept everything (no finite theta). Head 2: fixed theta.
  HeadStats chosen;
  chosen.computed_entries = 20;
  chosen.mass_groups = 3;
  chosen.mass_theta_min = 2.5f;
  chosen.mass_theta_max = 6.5f;
  chosen.mass_theta_sum = 13.0;
  chosen.mass_full_groups = 1;
  chosen.estimated_mass_sum = 7.2;
  HeadStats all_full;
  all_full.computed_entries = 36;
  all_full.mass_full_groups = 2;
  all_full.estimated_mass_sum = 8.0;
  HeadStats fixed_theta;
  fixed_theta.computed_entries = 36;
  const std::vector<HeadStats> heads = {chosen, all_full, fixed_theta};
  const RequestSummary summary = SummarizeHeads(8, heads);

  ASSERT_EQ(summary.heads.size(), 3u);
  const MassSummary& a = summary.heads[0].mass;
  EXPECT_DOUBLE_EQ(a.theta_min, 2.5);
  EXPECT_DOUBLE_EQ(a.theta_max, 6.5);
  EXPECT_DOUBLE_EQ(a.theta_mean, 13.0 / 3.0);
  EXPECT_EQ(a.groups, 3);
  EXPECT_EQ(a.full_groups, 1);
  EXPECT_DOUBLE_EQ(a.estimated_kept_mass, 0.9);
  const MassSummary& b = summary.heads[1].mass;
  EXPECT_EQ(b.groups, 0);
  EXPECT_EQ(b.full_groups, 2);
  EXPECT_DOUBLE_EQ(b.theta_min, 0.0);
  EXPECT_DOUBLE_EQ(b.theta_mean, 0.0);
  EXPECT_DOUBLE_EQ(b.theta_max, 0.0);
  EXPECT_DOUBLE_EQ(b.estimated_kept_mass, 1.0);
  const MassSummary& c = summary.heads[2].mass;
  EXPECT_EQ(c.groups, 0);
  EXPECT_EQ(c.full_groups, 0);
  EXPECT_DOUBLE_EQ(c.estimated_kept_mass, 0.0);
  EXPECT_DOUBLE_EQ(summary.estimated_kept_mass, (0.9 + 1.0 + 0.0) / 3.0);
}

TEST(SummarizeHeadsTest, EmptyInput) {
  const RequestSummary summary = SummarizeHeads(10, {});
  EXPECT_TRUE(summary.heads.empty());
  EXPECT_EQ(summary.density, 0.0);
}

AttentionTask RecallTask(DType dtype, void* out, float* lse) {
  AttentionTask task;
  task.shape = {2, 1, 1, 2};  // N = 2, one head, d = 2: 4 output elements, 2 rows
  task.dtype = dtype;
  task.out = out;
  task.maybe_lse = lse;
  return task;
}

TEST(ComputeRecallTest, HandComputedFp32) {
  std::vector<float> sparse = {0.0f, 0.004f, 0.009f, 0.02f};
  const std::vector<float> dense = {0.0f, 0.0f, 0.0f, 0.0f};
  std::vector<float> sparse_lse = {1.0f, 2.0f};
  const std::vector<float> dense_lse = {1.0f, 2.0f + std::log(2.0f)};
  const AttentionTask task = RecallTask(DType::kFp32, sparse.data(), sparse_lse.data());
  const RecallStats stats = ComputeRecall(task, dense.data(), dense_lse.data());
  EXPECT_DOUBLE_EQ(stats.output_recall_tau_0_01, 0.75);  // 0, 0.004, 0.009 < 0.01
  EXPECT_DOUBLE_EQ(stats.output_recall_tau_0_005, 0.5);  // 0, 0.004 < 0.005
  EXPECT_NEAR(stats.attention_mass_mean, 0.75, 1e-6);    // rows keep 1 and 1/2
  EXPECT_NEAR(stats.attention_mass_min, 0.5, 1e-6);
}

TEST(ComputeRecallTest, Bf16NaNAndMissingLse) {
  std::vector<uint16_t> sparse = {FloatToBf16(1.0f), FloatToBf16(0.5f),
                                  FloatToBf16(std::numeric_limits<float>::quiet_NaN()),
                                  FloatToBf16(-2.0f)};
  const std::vector<uint16_t> dense = {FloatToBf16(1.0f), FloatToBf16(0.5078125f),
                                       FloatToBf16(0.0f), FloatToBf16(-2.0f)};
  // Differences 0, 0.0078 (one bf16 ulp at 0.5), NaN (a miss), 0.
  const AttentionTask task = RecallTask(DType::kBf16, sparse.data(), nullptr);
  const RecallStats stats = ComputeRecall(task, dense.data(), nullptr);
  EXPECT_DOUBLE_EQ(stats.output_recall_tau_0_01, 0.75);
  EXPECT_DOUBLE_EQ(stats.output_recall_tau_0_005, 0.5);
  EXPECT_TRUE(std::isnan(stats.attention_mass_mean));
  EXPECT_TRUE(std::isnan(stats.attention_mass_min));
}

TEST(ComputeRecallTest, PerHeadMass) {
  // N = 2, Hq = 2, d = 1; LSE is [Hq, N]. Head 0 keeps 1/2 and 1/4 of its rows' mass, head 1
  // keeps everything (one row slightly above 1 from rounding, clamped).
  std::vector<float> out = {0, 0, 0, 0};
  std::vector<float> sparse_lse = {0.0f, 0.0f, 5.0f, 7.0f + 1e-6f};
  const std::vector<float> dense_lse = {std::log(2.0f), std::log(4.0f), 5.0f, 7.0f};
  AttentionTask task;
  task.shape = {2, 2, 1, 1};
  task.dtype = DType::kFp32;
  task.out = out.data();
  task.maybe_lse = sparse_lse.data();
  const RecallStats stats = ComputeRecall(task, out.data(), dense_lse.data());
  ASSERT_EQ(stats.head_attention_mass.size(), 2u);
  EXPECT_NEAR(stats.head_attention_mass[0], (0.5 + 0.25) / 2.0, 1e-6);
  EXPECT_DOUBLE_EQ(stats.head_attention_mass[1], 1.0);
  EXPECT_NEAR(stats.attention_mass_mean, (0.5 + 0.25 + 1.0 + 1.0) / 4.0, 1e-6);
  EXPECT_NEAR(stats.attention_mass_min, 0.25, 1e-6);
}

TEST(ComputeRecallTest, PerHeadMassWithoutLseIsNaN) {
  std::vector<float> out = {0, 0, 0, 0};
  AttentionTask task;
  task.shape = {2, 2, 1, 1};
  task.dtype = DType::kFp32;
  task.out = out.data();
  const RecallStats stats = ComputeRecall(task, out.data(), nullptr);
  ASSERT_EQ(stats.head_attention_mass.size(), 2u);
  EXPECT_TRUE(std::isnan(stats.head_attention_mass[0]));
  EXPECT_TRUE(std::isnan(stats.head_attention_mass[1]));
}

TEST(ComputeRecallTest, MassIsClampedToOne) {
  std::vector<float> out = {0, 0, 0, 0};
  std::vector<float> sparse_lse = {1.0f + 1e-6f, 3.0f};
  const std::vector<float> dense_lse = {1.0f, 3.0f};
  const AttentionTask task = RecallTask(DType::kFp32, out.data(), sparse_lse.data());
  const RecallStats stats = ComputeRecall(task, out.data(), dense_lse.data());
  EXPECT_DOUBLE_EQ(stats.attention_mass_mean, 1.0);
  EXPECT_DOUBLE_EQ(stats.attention_mass_min, 1.0);
  EXPECT_DOUBLE_EQ(stats.output_recall_tau_0_01, 1.0);
}

}  // namespace
}  // namespace anchorserve
