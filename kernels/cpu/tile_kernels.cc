#include "kernels/cpu/tile_kernels.h"

namespace anchorserve::cpu {

namespace portable {
extern const TileKernels kTileKernels;
}
#if defined(__x86_64__)
namespace avx2 {
extern const TileKernels kTileKernels;
}
namespace avx512 {
extern const TileKernels kTileKernels;
}
#endif

namespace {

#if defined(__x86_64__)
bool CpuHasAvx2Fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool CpuHasAvx512() {
  return CpuHasAvx2Fma() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw");
}
#endif

}  // namespace

const TileKernels& PortableTileKernels() { return portable::kTileKernels; }

std::vector<const TileKernels*> SupportedTileKernels() {
  std::vector<const TileKernels*> kernels;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (CpuHasAvx512()) kernels.push_back(&avx512::kTileKernels);
  if (CpuHasAvx2Fma()) kernels.push_back(&avx2::kTileKernels);
#endif
  kernels.push_back(&portable::kTileKernels);
  return kernels;
}

const TileKernels& SelectTileKernels() {
  static const TileKernels* const best = SupportedTileKernels().front();
  return *best;
}

}  // namespace anchorserve::cpu
