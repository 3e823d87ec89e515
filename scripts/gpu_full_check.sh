#!/usr/bin/env bash
# Builds everything the GPU machine runs (kernel tests, backend tests, benchmarks, the server and
# anchorctl) with CUDA here, packs it into .gpu/full and compresses that (the CUDA fat binaries
# alone are near the 64 MiB a device call may carry) into .gpu/fullpack/full.tar.xz. Then:
#   run(command="mkdir -p /tmp/b && tar -xJf .gpu/fullpack/full.tar.xz -C /tmp/b &&
#                scripts/gpu_full_remote.sh /tmp/b/full", carry=[".gpu/fullpack"], timeout_s=590)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build-gpu-full}
cmake -S "$root" -B "$build" -G Ninja -DANCHOR_ENABLE_CUDA=ON \
  -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache >/dev/null
targets=(anchor_gpu_tests anchor_cuda_plan_tests anchor_attention_kernel_test anchor_kernel_bench
  anchorserve anchorctl)
ninja -C "$build" -j"${JOBS:-2}" "${targets[@]}"
exes=()
for target in "${targets[@]}"; do exes+=("$build/bin/$target"); done
rm -rf "$root/.gpu/full" "$root/.gpu/fullpack"
"$root/scripts/gpu_bundle.sh" "$root/.gpu/full" "${exes[@]}"
strip "$root"/.gpu/full/anchor*
mkdir -p "$root/.gpu/fullpack"
tar -cJf "$root/.gpu/fullpack/full.tar.xz" -C "$root/.gpu" full
ls -la "$root/.gpu/fullpack"
