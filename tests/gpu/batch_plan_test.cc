// Host-only tests (label cpu) of the CUDA backend's batch planner: offsets, work lists, stripe
// list offsets and the workspace layout. No device is needed.
#include "kernels/cuda/batch_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "kernels/attention_types.h"
#include "kernels/cuda/attention_launch.h"
#include "kernels/cuda/identification_types.h"

namespace anchorserve::cuda {
namespace {

BatchPlanRequest Request(std::vector<int64_t> lens, int hq = 4, int hkv = 2, int d = 64,
                         Layout layout = Layout::kTokenMajor) {
  BatchPlanRequest request;
  request.seq_lens = std::move(lens);
  request.num_q_heads = hq;
  request.num_kv_heads = hkv;
  request.head_dim = d;
  request.layout = layout;
  return request;
}

int64_t BruteAnchorEntries(int64_t row_begin, int64_t rows, int64_t init_end, int64_t local_begin) {
  int64_t total = 0;
  for (int64_t i = row_begin; i < row_begin + rows; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      if (j < init_end || j >= local_begin) ++total;
    }
  }
  return total;
}

TEST(AnchorEntriesTest, MatchesBruteForce) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t row_begin = rng() % 300;
    const int64_t rows = 1 + rng() % 200;
    const int64_t init_end = rng() % 400;
    const int64_t local_begin = init_end + rng() % 400;
    EXPECT_EQ(AnchorEntriesOfGroup(row_begin, rows, init_end, local_begin),
              BruteAnchorEntries(row_begin, rows, init_end, local_begin))
        << "trial " << trial << " rows [" << row_begin << ", " << row_begin + rows << ") init_end "
        << init_end << " local_begin " << local_begin;
  }
}

TEST(BatchPlanTest, SeqDescsForBothLayouts) {
  for (Layout layout : {Layout::kTokenMajor, Layout::kHeadMajor}) {
    absl::StatusOr<BatchPlan> plan = PlanBatch(Request({100, 5000, 1}, 8, 2, 128, layout));
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_EQ(plan->seqs.size(), 3u);
    int64_t q = 0, kv = 0, lse = 0, groups = 0;
    for (int s = 0; s < 3; ++s) {
      const SeqDesc& desc = plan->seqs[s];
      const int64_t n = desc.seq_len;
      EXPECT_EQ(desc.q_offset, q);
      EXPECT_EQ(desc.kv_offset, kv);
      EXPECT_EQ(desc.lse_offset, lse);
      EXPECT_EQ(desc.group_begin, groups);
      if (layout == Layout::kTokenMajor) {
        EXPECT_EQ(desc.q_token_stride, 8 * 128);
        EXPECT_EQ(desc.q_head_stride, 128);
        EXPECT_EQ(desc.kv_token_stride, 2 * 128);
        EXPECT_EQ(desc.kv_head_stride, 128);
      } else {
        EXPECT_EQ(desc.q_token_stride, 128);
        EXPECT_EQ(desc.q_head_stride, n * 128);
        EXPECT_EQ(desc.kv_token_stride, 128);
        EXPECT_EQ(desc.kv_head_stride, n * 128);
      }
      q += n * 8 * 128;
      kv += n * 2 * 128;
      lse += n * 8;
      groups += (n + 2047) / 2048;
    }
    EXPECT_EQ(plan->q_elements, q);
    EXPECT_EQ(plan->kv_elements, kv);
    EXPECT_EQ(plan->lse_elements, lse);
    EXPECT_EQ(static_cast<int64_t>(plan->groups.size()), groups);
  }
}

// Every row of every sequence is in exactly one tile, tiles respect `limit` rows and never cross
// a boundary of `unit` rows (a group for attention tiles, a pooling block for anchor tiles).
void ExpectTiling(const BatchPlan& plan, const std::vector<QueryTile>& tiles, int limit,
                  int64_t unit, int64_t group_size) {
  std::vector<std::vector<int>> covered(plan.seqs.size());
  for (size_t s = 0; s < plan.seqs.size(); ++s) covered[s].assign(plan.seqs[s].seq_len, 0);
  for (const QueryTile& tile : tiles) {
    ASSERT_GE(tile.seq, 0);
    ASSERT_LT(tile.seq, static_cast<int>(plan.seqs.size()));
    EXPECT_GE(tile.q_len, 1);
    EXPECT_LE(tile.q_len, limit);
    EXPECT_EQ(tile.q_start / unit, (tile.q_start + tile.q_len - 1) / unit)
        << "tile [" << tile.q_start << ", " << tile.q_start + tile.q_len << ") crosses a unit";
    EXPECT_EQ(tile.group, tile.q_start / group_size);
    for (int r = tile.q_start; r < tile.q_start + tile.q_len; ++r) ++covered[tile.seq][r];
  }
  for (size_t s = 0; s < covered.size(); ++s) {
    for (size_t r = 0; r < covered[s].size(); ++r) {
      ASSERT_EQ(covered[s][r], 1) << "seq " << s << " row " << r;
    }
  }
}

TEST(BatchPlanTest, TilesCoverRowsWithoutCrossingGroupsOrBlocks) {
  struct Geometry {
    int block, step;
  };
  for (Geometry geometry :
       {Geometry{128, 16}, Geometry{100, 20}, Geometry{256, 8}, Geometry{64, 4}, Geometry{1, 3}}) {
    BatchPlanRequest request = Request({1, 127, 2048, 4097, 9000});
    request.config.block_size = geometry.block;
    request.config.step = geometry.step;
    absl::StatusOr<BatchPlan> plan = PlanBatch(request);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const int64_t group_size = int64_t{geometry.block} * geometry.step;
    ExpectTiling(*plan, plan->attention_tiles, kAttentionTileRows, group_size, group_size);
    ExpectTiling(*plan, plan->anchor_tiles, kAnchorTileRows, geometry.block, group_size);
    EXPECT_EQ(plan->pooled_rows % kPooledRowTile, 0);
    EXPECT_GE(plan->pooled_rows, geometry.step);
    EXPECT_LT(plan->pooled_rows, geometry.step + kPooledRowTile);

    // Blocks point at the anchor tiles that cover exactly their rows.
    ASSERT_EQ(plan->blocks.size(), plan->groups.size() * geometry.step);
    for (size_t gg = 0; gg < plan->groups.size(); ++gg) {
      const IdGroup& group = plan->groups[gg];
      for (int r = 0; r < geometry.step; ++r) {
        const IdBlock& block = plan->blocks[gg * geometry.step + r];
        const int64_t begin = group.row_begin + int64_t{r} * geometry.block;
        const int64_t rows =
            std::clamp<int64_t>(group.row_begin + group.rows - begin, 0, geometry.block);
        EXPECT_EQ(block.rows, rows);
        int64_t tile_rows = 0;
        for (int t = block.first_tile; t < block.first_tile + block.num_tiles; ++t) {
          const QueryTile& tile = plan->anchor_tiles[t];
          EXPECT_EQ(tile.seq, group.seq);
          EXPECT_GE(tile.q_start, begin);
          EXPECT_LE(tile.q_start + tile.q_len, begin + rows);
          tile_rows += tile.q_len;
        }
        EXPECT_EQ(tile_rows, rows);
      }
    }
  }
}

TEST(BatchPlanTest, GroupsCandidatesAndListOffsets) {
  for (auto [init, local] : {std::pair{1, 1}, std::pair{0, 1}, std::pair{2, 3}}) {
    BatchPlanRequest request = Request({4097, 20000, 300}, 3, 1);
    request.config.init_groups = init;
    request.config.local_groups = local;
    absl::StatusOr<BatchPlan> plan = PlanBatch(request);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const int hq = 3;
    ASSERT_EQ(plan->list_offset.size(), plan->groups.size() * hq);
    int64_t expected_offset = 0;
    for (size_t gg = 0; gg < plan->groups.size(); ++gg) {
      const IdGroup& group = plan->groups[gg];
      const SeqDesc& seq = plan->seqs[group.seq];
      EXPECT_EQ(group.row_begin, int64_t{group.group} * 2048);
      EXPECT_EQ(group.rows, std::min<int64_t>(2048, seq.seq_len - group.row_begin));
      EXPECT_EQ(seq.group_begin + group.group, static_cast<int64_t>(gg));
      // C_g = [n_init * G, (g - n_loc + 1) * G).
      const int64_t begin = int64_t{init} * 2048;
      const int64_t end = (int64_t{group.group} - local + 1) * 2048;
      const int64_t candidates = std::max<int64_t>(0, end - begin);
      EXPECT_EQ(std::max(0, group.cand_end - group.cand_begin), candidates) << "group " << gg;
      if (candidates > 0) {
        EXPECT_EQ(group.cand_begin, begin);
        EXPECT_EQ(group.cand_end, end);
        EXPECT_LE(group.cand_end, group.row_begin);
      }
      EXPECT_GE(group.list_capacity, candidates);
      EXPECT_LT(group.list_capacity, candidates + kListAlign);
      EXPECT_EQ(group.list_capacity % kListAlign, 0);
      for (int h = 0; h < hq; ++h) {
        EXPECT_EQ(plan->list_offset[gg * hq + h], expected_offset);
        expected_offset += group.list_capacity;
      }
    }
    EXPECT_EQ(plan->list_entries, expected_offset);
  }
}

TEST(BatchPlanTest, StripeItemsCoverEveryCandidateOnce) {
  absl::StatusOr<BatchPlan> plan = PlanBatch(Request({4097, 131072 / 8 + 5, 9000}));
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::vector<std::vector<int>> covered(plan->groups.size());
  for (size_t gg = 0; gg < plan->groups.size(); ++gg) {
    const IdGroup& group = plan->groups[gg];
    covered[gg].assign(std::max(0, group.cand_end - group.cand_begin), 0);
  }
  for (const StripeItem& item : plan->stripe_items) {
    ASSERT_GE(item.batch_group, 0);
    ASSERT_LT(item.batch_group, static_cast<int>(plan->groups.size()));
    const IdGroup& group = plan->groups[item.batch_group];
    EXPECT_LT(item.key_begin, item.key_end);
    EXPECT_LE(item.key_end - item.key_begin, kStripeChunkKeys);
    EXPECT_EQ((item.key_begin - group.cand_begin) % 64, 0);
    EXPECT_GE(item.key_begin, group.cand_begin);
    EXPECT_LE(item.key_end, group.cand_end);
    for (int key = item.key_begin; key < item.key_end; ++key) {
      ++covered[item.batch_group][key - group.cand_begin];
    }
  }
  for (size_t gg = 0; gg < covered.size(); ++gg) {
    for (size_t c = 0; c < covered[gg].size(); ++c) ASSERT_EQ(covered[gg][c], 1);
  }
}

TEST(BatchPlanTest, DensePlanHasNoIdentificationWork) {
  BatchPlanRequest request = Request({5000, 70});
  request.sparse = false;
  absl::StatusOr<BatchPlan> plan = PlanBatch(request);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_TRUE(plan->anchor_tiles.empty());
  EXPECT_TRUE(plan->blocks.empty());
  EXPECT_TRUE(plan->stripe_items.empty());
  EXPECT_FALSE(plan->attention_tiles.empty());
  const WorkspaceLayout layout = LayoutWorkspace(*plan, 2, false);
  EXPECT_EQ(layout.index, 0);
  EXPECT_EQ(layout.bitmask_words, 0);
  EXPECT_GE(layout.total_bytes, 2 * (plan->q_elements + plan->kv_elements) * 2);
}

TEST(BatchPlanTest, WorkspaceBuffersAreAlignedAndDisjoint) {
  absl::StatusOr<BatchPlan> plan = PlanBatch(Request({4097, 9000}, 8, 2, 128));
  ASSERT_TRUE(plan.ok()) << plan.status();
  const WorkspaceLayout layout = LayoutWorkspace(*plan, 2, true);
  const int64_t hq = 8, d = 128;
  const int64_t pooled = static_cast<int64_t>(plan->groups.size()) * hq * plan->pooled_rows;
  const std::vector<std::pair<int64_t, int64_t>> buffers = {
      {layout.q, plan->q_elements * 2},
      {layout.k, plan->kv_elements * 2},
      {layout.v, plan->kv_elements * 2},
      {layout.out, plan->q_elements * 2},
      {layout.lse, plan->lse_elements * 4},
      {layout.index, plan->list_entries * 4},
      {layout.bitmask, plan->list_entries / 8},
      {layout.tile_qsum, static_cast<int64_t>(plan->anchor_tiles.size()) * hq * d * 8},
      {layout.pooled_split, pooled * 3 * d * 2},
      {layout.row_anchor, plan->lse_elements * 4},
      {layout.counts, static_cast<int64_t>(plan->list_offset.size()) * 4},
  };
  for (size_t a = 0; a < buffers.size(); ++a) {
    EXPECT_EQ(buffers[a].first % 256, 0) << "buffer " << a;
    EXPECT_LE(buffers[a].first + buffers[a].second, layout.total_bytes) << "buffer " << a;
    for (size_t b = a + 1; b < buffers.size(); ++b) {
      const bool disjoint = buffers[a].first + buffers[a].second <= buffers[b].first ||
                            buffers[b].first + buffers[b].second <= buffers[a].first;
      EXPECT_TRUE(disjoint) << "buffers " << a << " and " << b;
    }
  }
  EXPECT_EQ(layout.bitmask_words * 32, plan->list_entries);
}

TEST(BatchPlanTest, RejectsBadRequests) {
  EXPECT_FALSE(PlanBatch(Request({})).ok());
  EXPECT_FALSE(PlanBatch(Request({0})).ok());
  EXPECT_FALSE(PlanBatch(Request({int64_t{1} << 31})).ok());
  EXPECT_FALSE(PlanBatch(Request({10}, 3, 2)).ok());
  EXPECT_FALSE(PlanBatch(Request({10}, 4, 2, 60)).ok());
  BatchPlanRequest request = Request({10});
  request.config.step = 0;
  EXPECT_FALSE(PlanBatch(request).ok());
  request = Request({10});
  request.attention_tile_rows = 64;
  EXPECT_FALSE(PlanBatch(request).ok());
}

// Mass-target plans add, after the candidate items, items that cover exactly the anchor region
// of each group with candidates up to its last row (the sampled rows' A(i)), and a workspace with
// the row anchors and the level and histogram buffers.
TEST(BatchPlanTest, MassTargetPlanCoversTheAnchorRegionOfGroupsWithCandidates) {
  BatchPlanRequest request = Request({9000, 300, 5000}, 4, 1, 64);
  request.config.mass_target = 0.9f;
  absl::StatusOr<BatchPlan> plan = PlanBatch(request);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_TRUE(plan->mass);
  ASSERT_LT(plan->candidate_items, static_cast<int32_t>(plan->stripe_items.size()));
  std::vector<std::vector<int>> covered(plan->groups.size());
  for (size_t i = 0; i < plan->stripe_items.size(); ++i) {
    const StripeItem& item = plan->stripe_items[i];
    EXPECT_EQ(item.kind,
              static_cast<int32_t>(i) < plan->candidate_items ? kCandidates : kAnchorRegion);
    if (item.kind != kAnchorRegion) continue;
    EXPECT_LE(item.key_end - item.key_begin, kStripeChunkKeys);
    std::vector<int>& keys = covered[item.batch_group];
    const IdGroup& group = plan->groups[item.batch_group];
    keys.resize(group.row_begin + group.rows, 0);
    for (int key = item.key_begin; key < item.key_end; ++key) ++keys[key];
  }
  int groups_with_candidates = 0;
  for (size_t gg = 0; gg < plan->groups.size(); ++gg) {
    const IdGroup& group = plan->groups[gg];
    if (group.cand_end <= group.cand_begin) {
      EXPECT_TRUE(covered[gg].empty()) << gg;
      continue;
    }
    ++groups_with_candidates;
    ASSERT_EQ(covered[gg].size(), static_cast<size_t>(group.row_begin + group.rows)) << gg;
    for (int key = 0; key < group.row_begin + group.rows; ++key) {
      const bool in_anchor = key < group.cand_begin || key >= group.cand_end;
      EXPECT_EQ(covered[gg][key], in_anchor ? 1 : 0) << "group " << gg << " key " << key;
    }
  }
  EXPECT_EQ(groups_with_candidates, 3 + 0 + 1);  // 9000: groups 2-4 of 5; 5000: group 2 of 3
  const WorkspaceLayout layout = LayoutWorkspace(*plan, 2, false);
  EXPECT_NE(layout.row_anchor, 0);
  EXPECT_GT(layout.mass_scratch_bytes, 0);
  EXPECT_GT(layout.mass_choice, layout.mass_levels);

  request.config.mass_target = 0.0f;
  plan = PlanBatch(request);
  ASSERT_TRUE(plan.ok());
  EXPECT_FALSE(plan->mass);
  EXPECT_EQ(plan->candidate_items, static_cast<int32_t>(plan->stripe_items.size()));
  EXPECT_EQ(LayoutWorkspace(*plan, 2, false).row_anchor, 0);
}

}  // namespace
}  // namespace anchorserve::cuda
