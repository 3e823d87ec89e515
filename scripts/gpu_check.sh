#!/usr/bin/env bash
# Builds the CUDA identification/backend tests and the end-to-end kernel benchmark here (no GPU
# needed), packs them into .gpu/bundle, and prints the device `run` call that executes
# scripts/gpu_remote.sh there (tests, then cuDNN baseline and benchmark; outputs under $OUT).
#
#   scripts/gpu_check.sh            # build dir: build-cuda-id (BUILD_DIR=... to change), -j2
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build-cuda-id}
jobs=${JOBS:-2}
cd "$root"
cmake -S "$root" -B "$build" -G Ninja -DANCHOR_ENABLE_CUDA=ON \
  -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache >/dev/null
targets=(anchor_gpu_tests anchor_cuda_plan_tests anchor_kernel_bench)
ninja -C "$build" -j"$jobs" "${targets[@]}"
# The planner tests need no device: run them here first.
"$build/bin/anchor_cuda_plan_tests" --gtest_brief=1
rm -rf "$root/.gpu/bundle"
exes=()
for target in "${targets[@]}"; do exes+=("$build/bin/$target"); done
"$root/scripts/gpu_bundle.sh" "$root/.gpu/bundle" "${exes[@]}"
cat <<MSG

Device call (one run: tests, then sdpa baseline + benchmark):
  run(command="scripts/gpu_remote.sh .gpu/bundle", carry=[".gpu/bundle"], timeout_s=540)
Optional benchmark arguments follow the bundle, e.g.
  scripts/gpu_remote.sh .gpu/bundle --lengths=4096,131072 --reps=3
NCU=1 in front adds an Nsight Compute profile of the identification kernels at N = 32k.
Results come back under files_at: tests.log, sdpa.log, bench.log, anchor_kernel_bench.{csv,json}.
MSG
