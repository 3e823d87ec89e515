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

// A chunk of a group's candidate keys, scored by one CTA against the pooled queries of every
// query head that shares a KV head.
struct StripeItem {
  int32_t batch_group;
  int32_t key_begin;  // within the sequence; key_begin - cand_begin is a multiple of 64
  int32_t key_end;
  int32_t reserved;
};

// The counts of anchorserve::HeadStats the GPU computes (CopyHeadStats copies them field by
// field; the mass-target fields stay zero: the CUDA backend does not run mass targets).
struct DeviceHeadStats {
  int64_t computed_entries;
  int64_t stripe_entries;
  int64_t stripe_groups;
  int64_t stripes_total;
  int64_t stripes_min;
  int64_t stripes_max;
};

struct IdentificationParams {
  ElemType elem_type;
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t head_dim;     // 64 or 128
  float softmax_scale;  // applied in fp32 to the fp32 dot products
  float theta;          // finite, or -inf (nothing selected)
  AnchorGeometry geometry;
  int32_t pooled_rows;  // step rounded up to kPooledRowTile (rows per head in pooled arrays)

  const void* q;  // per SeqDesc
  const void* k;

  const SeqDesc* seqs;  // [num_seqs]
  int32_t num_seqs;
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
  DeviceHeadStats* head_stats;  // [num_seqs, Hq]
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
