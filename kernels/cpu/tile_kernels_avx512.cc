// AVX-512 variant (compiled with -mavx512f and friends; only called when the CPU has them).
#define ANCHOR_TILE_NAMESPACE avx512
#define ANCHOR_TILE_NAME "avx512"
#define ANCHOR_VEC_WIDTH 16
#define ANCHOR_SCORE_MR 8
#define ANCHOR_SCORE_NV 2
#define ANCHOR_PV_MR 8
#define ANCHOR_PV_NV 2
#include "kernels/cpu/tile_kernels_impl.inc"
