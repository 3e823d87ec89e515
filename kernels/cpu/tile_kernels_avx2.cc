// AVX2 + FMA variant (compiled with -mavx2 -mfma; only called when the CPU has both).
#define ANCHOR_TILE_NAMESPACE avx2
#define ANCHOR_TILE_NAME "avx2"
#define ANCHOR_VEC_WIDTH 8
#define ANCHOR_SCORE_MR 4
#define ANCHOR_SCORE_NV 2
#define ANCHOR_PV_MR 4
#define ANCHOR_PV_NV 2
#include "kernels/cpu/tile_kernels_impl.inc"
