#include "kernels/cuda/batch_plan.h"

#include <algorithm>
#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/attention_launch.h"

namespace anchorserve::cuda {
namespace {

int64_t RoundUp(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

}  // namespace

absl::StatusOr<BatchPlan> PlanBatch(const BatchPlanRequest& request) {
  if (request.seq_lens.empty()) return absl::InvalidArgumentError("empty batch");
  if (request.num_q_heads <= 0 || request.num_kv_heads <= 0 ||
      request.num_q_heads % request.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_q_heads (", request.num_q_heads,
                     ") must be a positive multiple of num_kv_heads (", request.num_kv_heads, ")"));
  }
  if (request.head_dim <= 0 || request.head_dim % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim must be a positive multiple of 8, got ", request.head_dim));
  }
  if (request.attention_tile_rows != kAttentionTileRows) {
    return absl::InvalidArgumentError(absl::StrCat("attention_tile_rows must be ",
                                                   kAttentionTileRows, " (the kernel's), got ",
                                                   request.attention_tile_rows));
  }
  if (absl::Status status = ValidateAnchorConfig(request.config); !status.ok()) return status;
  for (int64_t n : request.seq_lens) {
    if (n <= 0 || n > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError(
          absl::StrCat("seq_len must be in [1, 2^31 - 1] for the cuda backend, got ", n));
    }
  }

  const AnchorConfig& config = request.config;
  const int hq = request.num_q_heads;
  const int hkv = request.num_kv_heads;
  const int d = request.head_dim;
  const int64_t group_size = config.GroupSize();  // <= 4096 * 1024
  const int64_t init_end = int64_t{config.init_groups} * group_size;

  BatchPlan plan;
  plan.num_q_heads = hq;
  plan.num_kv_heads = hkv;
  plan.head_dim = d;
  plan.sparse = request.sparse;
  plan.mass = request.sparse && config.UsesMassTarget();
  plan.geometry = AnchorGeometry{static_cast<int32_t>(group_size), config.block_size, config.step,
                                 config.init_groups, config.local_groups};
  plan.pooled_rows = static_cast<int>(RoundUp(config.step, kPooledRowTile));

  std::vector<int32_t> lens32;
  for (int seq = 0; seq < static_cast<int>(request.seq_lens.size()); ++seq) {
    const int64_t n = request.seq_lens[seq];
    lens32.push_back(static_cast<int32_t>(n));
    const TensorStrides q_strides = StridesFor(request.layout, n, hq, d);
    const TensorStrides kv_strides = StridesFor(request.layout, n, hkv, d);
    SeqDesc desc;
    desc.q_offset = plan.q_elements;
    desc.kv_offset = plan.kv_elements;
    desc.q_token_stride = q_strides.token;
    desc.q_head_stride = q_strides.head;
    desc.kv_token_stride = kv_strides.token;
    desc.kv_head_stride = kv_strides.head;
    desc.lse_offset = plan.lse_elements;
    desc.seq_len = static_cast<int32_t>(n);
    desc.group_begin = static_cast<int32_t>(plan.groups.size());
    plan.seqs.push_back(desc);
    plan.q_elements += n * hq * d;
    plan.kv_elements += n * hkv * d;
    plan.lse_elements += n * hq;

    const int64_t num_groups = (n + group_size - 1) / group_size;
    if (plan.groups.size() + num_groups > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError("too many groups in one batch");
    }
    for (int64_t g = 0; g < num_groups; ++g) {
      IdGroup group{};
      group.seq = seq;
      group.group = static_cast<int32_t>(g);
      group.row_begin = static_cast<int32_t>(g * group_size);
      group.rows = static_cast<int32_t>(std::min(group_size, n - g * group_size));
      // C_g = [n_init * G, (g - n_loc + 1) * G); its end never passes g * G < n.
      const int64_t cand_end = (g - config.local_groups + 1) * group_size;
      if (cand_end > init_end) {
        group.cand_begin = static_cast<int32_t>(init_end);
        group.cand_end = static_cast<int32_t>(cand_end);
        group.list_capacity = static_cast<int32_t>(RoundUp(cand_end - init_end, kListAlign));
      }
      plan.groups.push_back(group);
    }
  }
  plan.attention_tiles = BuildQueryTiles(lens32, static_cast<int32_t>(group_size));

  plan.list_offset.reserve(plan.groups.size() * hq);
  for (const IdGroup& group : plan.groups) {
    for (int h = 0; h < hq; ++h) {
      plan.list_offset.push_back(plan.list_entries);
      plan.list_entries += group.list_capacity;
    }
  }

  if (!request.sparse) return plan;

  const int block = config.block_size;
  plan.blocks.reserve(plan.groups.size() * config.step);
  for (int32_t gg = 0; gg < static_cast<int32_t>(plan.groups.size()); ++gg) {
    const IdGroup& group = plan.groups[gg];
    for (int r = 0; r < config.step; ++r) {
      IdBlock id_block{};
      const int64_t block_begin = int64_t{r} * block;
      const int64_t rows = std::clamp<int64_t>(group.rows - block_begin, 0, block);
      id_block.rows = static_cast<int32_t>(rows);
      id_block.first_tile = static_cast<int32_t>(plan.anchor_tiles.size());
      for (int64_t start = 0; start < rows; start += kAnchorTileRows) {
        QueryTile tile;
        tile.seq = group.seq;
        tile.q_start = static_cast<int32_t>(group.row_begin + block_begin + start);
        tile.q_len = static_cast<int32_t>(std::min<int64_t>(kAnchorTileRows, rows - start));
        tile.group = group.group;
        plan.anchor_tiles.push_back(tile);
      }
      id_block.num_tiles = static_cast<int32_t>(plan.anchor_tiles.size()) - id_block.first_tile;
      plan.blocks.push_back(id_block);
    }
    for (int64_t key = group.cand_begin; key < group.cand_end; key += kStripeChunkKeys) {
      StripeItem item{};
      item.batch_group = gg;
      item.key_begin = static_cast<int32_t>(key);
      item.key_end =
          static_cast<int32_t>(std::min<int64_t>(key + kStripeChunkKeys, group.cand_end));
      item.kind = kCandidates;
      plan.stripe_items.push_back(item);
    }
  }
  plan.candidate_items = static_cast<int32_t>(
      std::min<size_t>(plan.stripe_items.size(), std::numeric_limits<int32_t>::max()));
  if (plan.mass) {
    // A(i) of the sampled rows: [0, init_end) and [cand_end, last row of the group].
    for (int32_t gg = 0; gg < static_cast<int32_t>(plan.groups.size()); ++gg) {
      const IdGroup& group = plan.groups[gg];
      if (group.cand_end <= group.cand_begin) continue;
      const int64_t ranges[2][2] = {{0, group.cand_begin},
                                    {group.cand_end, int64_t{group.row_begin} + group.rows}};
      for (const auto& range : ranges) {
        for (int64_t key = range[0]; key < range[1]; key += kStripeChunkKeys) {
          StripeItem item{};
          item.batch_group = gg;
          item.key_begin = static_cast<int32_t>(key);
          item.key_end = static_cast<int32_t>(std::min<int64_t>(key + kStripeChunkKeys, range[1]));
          item.kind = kAnchorRegion;
          plan.stripe_items.push_back(item);
        }
      }
    }
  }
  if (plan.anchor_tiles.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()) ||
      plan.stripe_items.size() * 8 > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError("batch too large for one launch");
  }
  return plan;
}

WorkspaceLayout LayoutWorkspace(const BatchPlan& plan, int element_bytes, bool keep_row_anchor,
                                TensorPlacement tensors) {
  WorkspaceLayout layout;
  int64_t cursor = 0;
  auto take = [&cursor](int64_t bytes) {
    const int64_t offset = cursor;
    cursor += RoundUp(bytes, 256);
    return offset;
  };
  const int64_t hq = plan.num_q_heads;
  const int64_t d = plan.head_dim;
  const bool sparse = plan.sparse;
  if (tensors == TensorPlacement::kInWorkspace) {
    layout.q = take(plan.q_elements * element_bytes);
    layout.k = take(plan.kv_elements * element_bytes);
    layout.v = take(plan.kv_elements * element_bytes);
    layout.out = take(plan.q_elements * element_bytes);
    layout.lse = take(plan.lse_elements * 4);
  }
  layout.seqs = take(plan.seqs.size() * sizeof(SeqDesc));
  layout.attention_tiles = take(plan.attention_tiles.size() * sizeof(QueryTile));
  layout.groups = take(plan.groups.size() * sizeof(IdGroup));
  layout.head_stats = take(static_cast<int64_t>(plan.seqs.size()) * hq * sizeof(DeviceHeadStats));
  if (sparse) {
    const int64_t num_groups = static_cast<int64_t>(plan.groups.size());
    const int64_t pooled = num_groups * hq * plan.pooled_rows;
    layout.anchor_tiles = take(plan.anchor_tiles.size() * sizeof(QueryTile));
    layout.blocks = take(plan.blocks.size() * sizeof(IdBlock));
    layout.list_offset = take(plan.list_offset.size() * sizeof(int64_t));
    layout.stripe_items = take(plan.stripe_items.size() * sizeof(StripeItem));
    layout.counts = take(plan.list_offset.size() * sizeof(int32_t));
    layout.index = take(plan.list_entries * sizeof(int32_t));
    layout.bitmask_words = plan.list_entries / 32;
    layout.bitmask = take(layout.bitmask_words * sizeof(uint32_t));
    layout.tile_qsum =
        take(static_cast<int64_t>(plan.anchor_tiles.size()) * hq * d * sizeof(double));
    layout.tile_xsum = take(static_cast<int64_t>(plan.anchor_tiles.size()) * hq * sizeof(double));
    layout.pooled_split = take(pooled * 3 * d * element_bytes);
    layout.pooled_unscale = take(pooled * sizeof(float));
    layout.pooled_anchor = take(pooled * sizeof(float));
    if (keep_row_anchor || plan.mass) layout.row_anchor = take(plan.lse_elements * sizeof(float));
    if (plan.mass) {
      const int64_t lists = static_cast<int64_t>(plan.list_offset.size());
      layout.mass_levels = take(plan.list_entries);
      // The zeroed scratch is one contiguous run: level_mass .. level_keys.
      const int64_t scratch_begin = cursor;
      layout.level_mass = take(pooled * kMassGridLevels * sizeof(float));
      layout.candidate_mass = take(pooled * sizeof(float));
      layout.anchor_mass = take(pooled * sizeof(float));
      layout.level_keys = take(lists * kMassGridLevels * sizeof(int32_t));
      layout.mass_scratch_bytes = cursor - scratch_begin;
      layout.mass_choice = take(lists * sizeof(MassChoiceRecord));
    }
  }
  layout.total_bytes = cursor;
  return layout;
}

}  // namespace anchorserve::cuda
