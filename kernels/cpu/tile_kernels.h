// The hot inner loops of the CPU backend: one online-softmax step of a query tile against a key
// tile, and plain score tiles. Compiled once per instruction set (portable, AVX2+FMA, AVX-512)
// from tile_kernels_impl.inc; SelectTileKernels() picks the best one the CPU supports at run
// time, so the binary runs on any x86-64.
#pragma once

#include <cstdint>
#include <vector>

namespace anchorserve::cpu {

// Tile sizes shared by every instruction set (each one's register blocks divide them).
inline constexpr int kTileRows = 64;   // query rows per tile
inline constexpr int kTileKeys = 128;  // keys per tile
inline constexpr int kDimAlign = 32;   // head dims are zero-padded to a multiple of this
inline constexpr int kRowAlign = 8;    // score_tile row counts must be a multiple of this

inline int PaddedHeadDim(int head_dim) {
  return (head_dim + kDimAlign - 1) / kDimAlign * kDimAlign;
}

// One online-softmax step: row r of the query tile (absolute row row0 + r) against column c of the
// key tile (absolute key key0 + c). Column c is used by row r when key0 + c lies in
// [key_begin, key_end), c < num_keys and, for causal tiles, key0 + c <= row0 + r. All scores are
// in base-2 units (q is pre-multiplied by softmax_scale * log2(e)).
struct AttendTileArgs {
  const float* q = nullptr;   // [round_up(rows, kRowAlign), d_pad], rows past `rows` zero
  int rows = 0;               // valid query rows, <= kTileRows
  int d_pad = 0;              // padded head dim (multiple of kDimAlign)
  const float* kt = nullptr;  // [d_pad, kTileKeys]: the key tile transposed
  const float* v = nullptr;   // [kTileKeys, d_pad]
  int num_keys = kTileKeys;   // columns present in the tile
  int64_t row0 = 0;
  int64_t key0 = 0;
  int64_t key_begin = 0;
  int64_t key_end = 0;
  bool causal = false;
  float* m = nullptr;       // [rows] running max, base 2; -inf before the first key
  float* l = nullptr;       // [rows] running sum of exp2(s - m)
  float* acc = nullptr;     // [round_up(rows, kRowAlign), d_pad] running sum of p * v
  float* scores = nullptr;  // scratch, [kTileRows, kTileKeys]
};

struct TileKernels {
  const char* name;  // "avx512", "avx2" or "portable"
  void (*attend_tile)(const AttendTileArgs& args);
  // scores[r][c] = sum_e q[r][e] * kt[e][c] for r < rows, c < cols.
  // q: [rows, d_pad] with rows a multiple of kRowAlign; kt: [d_pad, kTileKeys];
  // cols <= kTileKeys, rounded up internally to the register block (kt must be readable there).
  // scores: [rows, kTileKeys].
  void (*score_tile)(const float* q, int rows, int d_pad, const float* kt, int cols, float* scores);
};

const TileKernels& PortableTileKernels();
// The fastest kernels this CPU runs.
const TileKernels& SelectTileKernels();
// Every variant this CPU can run (for tests), fastest first.
std::vector<const TileKernels*> SupportedTileKernels();

}  // namespace anchorserve::cpu
