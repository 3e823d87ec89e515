// Framework-free parameter structs shared by the CUDA kernels of one batch launch.
// Plain C++ (no CUDA, absl or proto types) so host code and .cu files both include it.
//
// A batch is a list of sequences of different lengths that share dtype, head counts, head_dim
// and AnchorConfig. Each sequence's Q/K/V/out live in one device buffer per tensor, at the
// element offsets and strides its SeqDesc gives (both token-major and head-major layouts are
// expressed by the strides, so nothing is transposed).
#pragma once

#include <cstdint>

namespace anchorserve::cuda {

// Mirror of the 16-bit anchorserve::DType values, same numbers (checked in attention_runner.cc),
// so that the kernel objects build without anchor_core.
enum class ElemType : int32_t { kBf16 = 0, kFp16 = 1 };

struct SeqDesc {
  int64_t q_offset;        // element offset of q[token 0, head 0, 0]; out uses the same
  int64_t kv_offset;       // element offset of k/v[token 0, head 0, 0]
  int64_t q_token_stride;  // elements between consecutive tokens of q/out
  int64_t q_head_stride;   // elements between consecutive heads of q/out
  int64_t kv_token_stride;
  int64_t kv_head_stride;
  int64_t lse_offset;   // element offset of this sequence's [Hq, seq_len] LSE block
  int32_t seq_len;      // N
  int32_t group_begin;  // index of this sequence's group 0 among the batch's groups
};

// One query tile of one sequence. Tiles never straddle a group boundary, so every row of a
// tile shares one stripe set. The host builds the list; the grid is [num_tiles, Hq].
struct QueryTile {
  int32_t seq;      // index into seqs
  int32_t q_start;  // first row of the tile
  int32_t q_len;    // rows in the tile, <= the kernel's tile height
  int32_t group;    // group of the tile within its sequence (q_start / G)
};

struct AnchorGeometry {
  int32_t group_size;    // G = block_size * step
  int32_t block_size;    // B
  int32_t step;          // s
  int32_t init_groups;   // n_init
  int32_t local_groups;  // n_loc
};

// The stripe set of (batch group gg, query head h) is
//   stripe_index[stripe_list_offset[gg * Hq + h] + 0 .. stripe_count[gg * Hq + h])
// sorted ascending. Lists are sized by their bound |C_g|, never by N.
struct StripeLists {
  const int64_t* list_offset;  // [num_batch_groups * Hq]
  int32_t* count;              // [num_batch_groups * Hq]
  int32_t* index;              // [sum of bounds] key positions within the sequence
};

// K and V of every sequence of a batch as one strided tensor [num_tokens, Hkv, d] (d contiguous)
// starting `base_offset` elements into k / v, so that whole contiguous key tiles can be copied
// by the tensor memory accelerator (TMA). It exists when all sequences share kv_token_stride and
// kv_head_stride and their kv_offsets are base_offset plus whole numbers of tokens
// (UniformKvTensor in attention_launch.h decides). num_tokens = 0: no such tensor (or the caller
// did not say); every key tile is then copied row by row.
struct KvTensorShape {
  int64_t base_offset;   // elements; a multiple of 8 (16 bytes)
  int64_t num_tokens;    // max over sequences of (kv_offset - base_offset) / token_stride + seq_len
  int64_t token_stride;  // elements
  int64_t head_stride;   // elements
};

struct AttentionParams {
  ElemType elem_type;
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  float softmax_scale;  // applied in fp32 to fp32 q.k (never rounded to 16 bits)

  const void* q;  // per SeqDesc: [N, Hq, d] or [Hq, N, d]
  const void* k;  // per SeqDesc: [N, Hkv, d] or [Hkv, N, d]
  const void* v;
  void* out;         // like q
  float* maybe_lse;  // [Hq, N] per sequence at SeqDesc::lse_offset; may be null

  const SeqDesc* seqs;  // [num_seqs] device
  int32_t num_seqs;
  KvTensorShape kv_tensor;  // optional (zeros: none)
  const QueryTile* tiles;   // [num_tiles] device
  int32_t num_tiles;

  // Sparse mode only (null/zero for dense): which keys each row attends is the anchor region
  // A(i) of `geometry` plus the stripes of its group.
  bool sparse;
  AnchorGeometry geometry;
  StripeLists stripes;
};

}  // namespace anchorserve::cuda
