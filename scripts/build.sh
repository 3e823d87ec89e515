#!/usr/bin/env bash
# Configures and builds into $ANCHOR_BUILD_DIR (default build/). CUDA is built when nvcc is found
# (set ANCHOR_ENABLE_CUDA=OFF to skip it). Extra arguments are build targets.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build_dir=${ANCHOR_BUILD_DIR:-$root/build}
# compile_commands.json is for source-level tools (scripts/check_thread_safety.sh, clangd).
cmake_args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_EXPORT_COMPILE_COMMANDS=ON)
if command -v ccache >/dev/null; then
  cmake_args+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  cmake_args+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
fi
if [ -n "${ANCHOR_ENABLE_CUDA:-}" ]; then cmake_args+=(-DANCHOR_ENABLE_CUDA="$ANCHOR_ENABLE_CUDA"); fi
cmake -S "$root" -B "$build_dir" "${cmake_args[@]}" >/dev/null
jobs=${ANCHOR_BUILD_JOBS:-$(nproc)}
cmake --build "$build_dir" -j "$jobs" ${1:+--target "$@"}
