// Work lists and parameters of the stripe-identification kernels (anchor, pooling, stripe
// scoring, compaction, per-head metrics). Plain C++ (no CUDA or absl types): the host planner
// (batch_plan.h), the launchers and the .cu files all include it.
#pragma once

#include <cstdint>

#include "kernels/cuda/attention_params.h"

#if defined(__CUDACC__)
#define ANCHOR_HOST_DEVICE __host__ __device__
#else
#define ANCHOR_HOST_DEVICE
#endif

namespace anchorserve::cuda {

// Pooled query rows per m16 tile of the stripe kernel; a head's s pooled rows are padded to a
// multiple of this so that every tensor-core row tile belongs to one head.
inline constexpr int kPooledRowTile = 16;
// Query rows per anchor tile (one CTA row tile); anchor tiles never straddle a pooling block.
inline constexpr int kAnchorTileRows = 128;
// Candidate keys per stripe-scoring work item.
inline constexpr int kStripeChunkKeys = 2048;
// Stripe lists and their bitmasks start at multiples of this many keys.
inline constexpr int kListAlign = 32;

// One group of one sequence ("batch group"; index = position in IdentificationParams::groups).
struct IdGroup {
  int32_t seq;            // index into seqs
  int32_t group;          // g within the sequence
  int32_t row_begin;      // g * G
  int32_t rows;           // rows(g): G, or fewer for a last partial group
  int32_t cand_begin;     // C_g = [cand_begin, cand_end)
  int32_t cand_end;       // cand_end <= cand_begin means no candidates
  int32_t list_capacity;  // |C_g| rounded up to kListAlign (0 without candidates)
  int32_t reserved;
};

// Pooling block r of batch group gg, at blocks[gg * step + r].
struct IdBlock {
  int32_t first_tile;  // first anchor tile of the block
  int32_t num_tiles;   // anchor tiles that cover it (0 when the block has no rows)
  int32_t rows;        // rows present
  int32_t reserved;
};

// What a stripe item covers: candidate keys, or (mass-target plans, appended after the candidate
// items) keys of the anchor region A of a group with candidates, scored only by the sampled rows
// for their anchor-region mass.
enum StripeItemKind : int32_t { kCandidates = 0, kAnchorRegion = 1 };

// A chunk of a group's keys, scored by one CTA against the rows of every query head that shares
// a KV head.
struct StripeItem {
  int32_t batch_group;
  int32_t key_begin;  // within the sequence; key_begin - cand_begin is a multiple of 64
  int32_t key_end;
  int32_t kind;  // StripeItemKind
};

// Mass-target mode (docs/anchorattention.md section 8): the grid of per-group thresholds,
// mirrored from kernels/attention_types.h (static_assert in attention_runner.cc).
inline constexpr int kMassGridLevels = 161;  // levels 0..kMassThetaBins; a key past them is 161
inline constexpr float kMassGridStep = 0.25f;
inline constexpr float kMassWeightCeiling = 40.0f;

// What one (batch group, query head) with candidates chose.
struct MassChoiceRecord {
  int32_t level;   // grid level k kept (level(j) <= k), or kMassGridLevels: every candidate
  float theta;     // mass_min_theta + k * step, or +inf
  float estimate;  // estimated kept mass F(k) (1 when every candidate is kept)
  int32_t reserved;
};

// anchorserve::HeadStats as the GPU computes it (CopyHeadStats copies it field by field).
struct DeviceHeadStats {
  int64_t computed_entries;
  int64_t stripe_entries;
  int64_t stripe_groups;
  int64_t stripes_total;
  int64_t stripes_min;
  int64_t stripes_max;
  // Mass-target mode only.
  int64_t mass_groups;
  int64_t mass_full_groups;
  double mass_theta_sum;
  double estimated_mass_sum;
  float mass_theta_min;
  float mass_theta_max;
};

// Mass-target selection: the request's target and the per-(group, head) scratch of the stripe
// stage. Off (enabled == 0) for fixed-theta plans, whose buffers are then null.
struct MassTargetParams {
  int32_t enabled;
  float target;           // p in (0, 1]
  float density_cap;      // (0, 1]
  float min_theta;        // the grid's first threshold
  int32_t num_items;      // stripe items including the anchor-region ones (items[num_items])
  uint8_t* levels;        // [list capacity] grid level of every candidate, at list_offset
  float* level_mass;      // [groups * Hq, pooled_rows, kMassGridLevels] sampled-row weight by level
  float* candidate_mass;  // [groups * Hq, pooled_rows] sum of the weights over all of C_g
  float* anchor_mass;     // [groups * Hq, pooled_rows] sum over A(i) of exp(s_ij - x(i))
  int32_t* level_keys;    // [groups * Hq, kMassGridLevels] candidates per level
  int64_t scratch_bytes;  // level_mass .. level_keys: one run, cleared before scoring
  MassChoiceRecord* choice;  // [groups * Hq]
};

struct IdentificationParams {
  ElemType elem_type;
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t head_dim;     // 64 or 128
  float softmax_scale;  // applied in fp32 to the fp32 dot products
  float theta;          // finite, or -inf (nothing selected); unused in mass-target mode
  AnchorGeometry geometry;
  int32_t pooled_rows;  // step rounded up to kPooledRowTile (rows per head in pooled arrays)

  const void* q;  // per SeqDesc
  const void* k;

  const SeqDesc* seqs;  // [num_seqs]
  int32_t num_seqs;
  KvTensorShape kv_tensor;        // optional (zeros: none); K tiles in bulk when given
  const QueryTile* anchor_tiles;  // [num_anchor_tiles]
  int32_t num_anchor_tiles;
  const IdGroup* groups;  // [num_groups]
  int32_t num_groups;
  const IdBlock* blocks;    // [num_groups * step]
  const StripeItem* items;  // [num_items]
  int32_t num_items;

  StripeLists lists;  // list_offset [num_groups * Hq] (multiples of kListAlign), count, index

  // Workspace (device).
  double* tile_qsum;      // [num_anchor_tiles, Hq, d]  sum of q rows of the tile
  double* tile_xsum;      // [num_anchor_tiles, Hq]     sum of the anchors x(i) of the tile
  void* pooled_split;     // [num_groups, Hq, pooled_rows, 3, d] elem_type: 2^e*qbar = hi+mid+lo
  float* pooled_unscale;  // [num_groups, Hq, pooled_rows] 2^-e
  float* pooled_anchor;   // [num_groups, Hq, pooled_rows] abar_r; +inf for rows without queries
  uint32_t* bitmask;      // [list capacity / 32] one bit per candidate key, at list_offset / 32
  int64_t bitmask_words;
  float* maybe_row_anchor;      // [Hq, N] per sequence at SeqDesc::lse_offset: x(i); may be null
                                // (never in mass-target mode: the sampled rows read it)
  DeviceHeadStats* head_stats;  // [num_seqs, Hq]
  MassTargetParams mass;
};

// Sum over v in [first, last] of min(cap, v).
ANCHOR_HOST_DEVICE inline int64_t SumOfMin(int64_t first, int64_t last, int64_t cap) {
  if (last < first) return 0;
  if (cap >= last) return (first + last) * (last - first + 1) / 2;
  if (cap < first) return cap * (last - first + 1);
  return (first + cap) * (cap - first + 1) / 2 + cap * (last - cap);
}

// sum over rows i of group g (rows [row_begin, row_begin + rows)) of |A(i)|, where
// A(i) = [0, min(init_end, i + 1)) U [local_begin, i + 1) and local_begin >= init_end:
// init_end = n_init * G, local_begin = max(init_end, (g - n_loc + 1) * G, 0).
ANCHOR_HOST_DEVICE inline int64_t AnchorEntriesOfGroup(int64_t row_begin, int64_t rows,
                                                       int64_t init_end, int64_t local_begin) {
  const int64_t first = row_begin + 1;  // i + 1 over the group's rows
  const int64_t last = row_begin + rows;
  int64_t total = SumOfMin(first, last, init_end);
  const int64_t from = first > local_begin + 1 ? first : local_begin + 1;
  if (from <= last) total += (from - local_begin + last - local_begin) * (last - from + 1) / 2;
  return total;
}

}  // namespace anchorserve::cuda
