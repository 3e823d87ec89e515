// Mode auto: the anchor-region fraction against a row-by-row count, and the choice it drives.
#include <cstdint>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/attention_types.h"

namespace anchorserve {
namespace {

using ::testing::HasSubstr;

// Keys j <= r in the anchor region of row r: the first init_groups groups, or a key in one of
// the local_groups groups ending with r's own, counted one key at a time.
double AnchorFractionByRows(const AnchorConfig& c, int64_t n) {
  const int64_t group = c.GroupSize();
  int64_t in_region = 0, causal = 0;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j <= r; ++j) {
      const bool sink = j / group < c.init_groups;
      const bool local = j / group > r / group - c.local_groups;
      in_region += (sink || local) ? 1 : 0;
      ++causal;
    }
  }
  return static_cast<double>(in_region) / static_cast<double>(causal);
}

AnchorConfig Config(int block, int step, int init_groups, int local_groups) {
  AnchorConfig c;
  c.block_size = block;
  c.step = step;
  c.init_groups = init_groups;
  c.local_groups = local_groups;
  return c;
}

TEST(AttentionModeTest, AnchorRegionFractionMatchesARowByRowCount) {
  for (const AnchorConfig& c : {Config(4, 2, 1, 1), Config(3, 3, 0, 1), Config(2, 5, 2, 3),
                                Config(8, 1, 1, 2), Config(5, 4, 3, 1)}) {
    for (int64_t n : {1, 2, 7, 8, 9, 31, 64, 100, 257, 600}) {
      EXPECT_NEAR(AnchorRegionFraction(c, n), AnchorFractionByRows(c, n), 1e-12)
          << "B=" << c.block_size << " s=" << c.step << " n_init=" << c.init_groups
          << " n_loc=" << c.local_groups << " N=" << n;
    }
  }
}

TEST(AttentionModeTest, AutoIsDenseWhileTheAnchorRegionDominates) {
  AnchorConfig c;  // B 128, s 16: groups of 2048 rows
  c.mode = AttentionMode::kAuto;
  // Up to two groups every row sees only anchor-region keys.
  ModeChoice choice = ResolveMode(c, 4096);
  EXPECT_EQ(choice.mode, AttentionMode::kDense);
  EXPECT_THAT(choice.reason, HasSubstr("auto: dense"));
  EXPECT_THAT(choice.reason, HasSubstr("N=4096"));
  // 8k: the region is 62.5% of the causal entries; 16k: 34%.
  EXPECT_NEAR(AnchorRegionFraction(c, 8192), 20975616.0 / 33558528.0, 1e-12);
  EXPECT_EQ(ResolveMode(c, 8192).mode, AttentionMode::kDense);
  choice = ResolveMode(c, 16384);
  EXPECT_EQ(choice.mode, AttentionMode::kAnchor);
  EXPECT_THAT(choice.reason, HasSubstr("auto: anchor"));
  // The boundary: the last dense length and the first anchor one straddle the threshold.
  int64_t first_anchor = 0;
  for (int64_t n = 8192; n <= 16384 && first_anchor == 0; n += 1) {
    if (ResolveMode(c, n).mode == AttentionMode::kAnchor) first_anchor = n;
  }
  EXPECT_EQ(first_anchor, 10593);  // docs/anchorattention.md section 9 quotes it
  EXPECT_GT(AnchorRegionFraction(c, first_anchor - 1), kAutoDenseAnchorFraction);
  EXPECT_LE(AnchorRegionFraction(c, first_anchor), kAutoDenseAnchorFraction);
}

TEST(AttentionModeTest, ExplicitModesPassThroughWithoutReason) {
  AnchorConfig c;
  c.mode = AttentionMode::kAnchor;
  EXPECT_EQ(ResolveMode(c, 100).mode, AttentionMode::kAnchor);
  EXPECT_EQ(ResolveMode(c, 100).reason, "");
  c.mode = AttentionMode::kDense;
  EXPECT_EQ(ResolveMode(c, 1 << 20).mode, AttentionMode::kDense);
  EXPECT_EQ(ResolveMode(c, 1 << 20).reason, "");
}

}  // namespace
}  // namespace anchorserve
