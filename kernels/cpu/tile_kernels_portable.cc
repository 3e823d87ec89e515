// Baseline variant: 4-wide vectors, runs on any x86-64 (SSE2) or other target.
#define ANCHOR_TILE_NAMESPACE portable
#define ANCHOR_TILE_NAME "portable"
#define ANCHOR_VEC_WIDTH 4
#define ANCHOR_SCORE_MR 4
#define ANCHOR_SCORE_NV 2
#define ANCHOR_PV_MR 4
#define ANCHOR_PV_NV 2
#include "kernels/cpu/tile_kernels_impl.inc"
