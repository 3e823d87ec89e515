// Host-side planning of one CUDA batch launch: where each sequence lives in the packed device
// buffers (SeqDesc), the query-tile work lists of the attention and anchor kernels, the group
// table, the stripe-list offsets (sized by the bound |C_g|), the stripe-scoring work items, and
// the byte layout of the device workspace. Pure functions of the request: no CUDA calls, so
// they are unit-tested without a GPU.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/attention_types.h"
#include "kernels/cuda/attention_params.h"
#include "kernels/cuda/identification_types.h"

namespace anchorserve::cuda {

struct BatchPlanRequest {
  std::vector<int64_t> seq_lens;  // one entry per sequence, each >= 1
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  Layout layout = Layout::kTokenMajor;
  AnchorConfig config;
  bool sparse = true;             // false: dense attention; no identification work lists
  int attention_tile_rows = 128;  // the attention kernel's tile height
};

struct BatchPlan {
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  bool sparse = false;
  bool mass = false;  // mass-target selection (sparse plans only)
  AnchorGeometry geometry;
  int pooled_rows = 0;  // step rounded up to kPooledRowTile
  std::vector<SeqDesc> seqs;
  std::vector<QueryTile> attention_tiles;  // <= attention_tile_rows rows, never across groups
  std::vector<QueryTile> anchor_tiles;     // sparse: <= kAnchorTileRows, never across blocks
  std::vector<IdGroup> groups;             // every group of every sequence, in sequence order
  std::vector<IdBlock> blocks;             // sparse: [groups.size() * step]
  std::vector<int64_t> list_offset;        // [groups.size() * Hq], multiples of kListAlign
  // sparse: chunks of <= kStripeChunkKeys candidates; mass plans then add the anchor-region
  // chunks of the groups with candidates.
  std::vector<StripeItem> stripe_items;
  int32_t candidate_items = 0;  // the first candidate_items entries of stripe_items
  int64_t q_elements = 0;       // packed q (and out) elements over the batch
  int64_t kv_elements = 0;      // packed k (and v) elements
  int64_t lse_elements = 0;     // Hq * sum of seq_len
  int64_t list_entries = 0;     // int32 stripe index capacity: sum over lists of list_capacity
};

// INVALID_ARGUMENT for empty batches, non-positive or > INT32_MAX lengths, bad head counts or an
// invalid config.
absl::StatusOr<BatchPlan> PlanBatch(const BatchPlanRequest& request);

// Byte offsets of every buffer in one device allocation (each 256-byte aligned) and its size.
// Buffers a plan does not need have size 0.
struct WorkspaceLayout {
  int64_t q = 0, k = 0, v = 0, out = 0, lse = 0;
  int64_t seqs = 0, attention_tiles = 0, anchor_tiles = 0, groups = 0, blocks = 0;
  int64_t list_offset = 0, stripe_items = 0, counts = 0, index = 0, bitmask = 0;
  int64_t tile_qsum = 0, tile_xsum = 0, pooled_split = 0, pooled_unscale = 0, pooled_anchor = 0;
  int64_t row_anchor = 0, head_stats = 0;
  int64_t mass_levels = 0, level_mass = 0, candidate_mass = 0, anchor_mass = 0, level_keys = 0,
          mass_choice = 0;
  int64_t mass_scratch_bytes = 0;  // level_mass .. level_keys, cleared before each stripe stage
  int64_t bitmask_words = 0;
  int64_t total_bytes = 0;
};

// Where q/k/v/out/lse live: packed in the workspace (the host-buffer backend uploads into them)
// or in device buffers the caller owns (the workspace then holds only the plan and scratch).
enum class TensorPlacement { kInWorkspace, kCallerOwned };

// `element_bytes` of q/k/v/out; `keep_row_anchor` adds the [Hq, N] x(i) buffer (tests; mass
// plans always have it).
WorkspaceLayout LayoutWorkspace(const BatchPlan& plan, int element_bytes, bool keep_row_anchor,
                                TensorPlacement tensors = TensorPlacement::kInWorkspace);

}  // namespace anchorserve::cuda
