#!/bin/sh
# Builds anchorserve and anchorctl from SRC and installs them under OUT (bin/, plus
# share/anchorserve/runtime-packages.txt: the packages that own the shared libraries they load,
# which the runtime stage installs). Same steps for both image targets; ANCHOR_ENABLE_CUDA (ON or
# OFF) is the only difference. ANCHOR_BUILD_JOBS=0 uses every core.
#   build_server.sh SRC OUT
set -eu
src=$1
out=$2
build=/tmp/anchorserve-build
jobs=${ANCHOR_BUILD_JOBS:-0}
if [ "$jobs" -le 0 ]; then jobs=$(nproc); fi
case "${ANCHOR_ENABLE_CUDA:-}" in
  ON) cuda_args="-DANCHOR_ENABLE_CUDA=ON -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc" ;;
  OFF) cuda_args="-DANCHOR_ENABLE_CUDA=OFF" ;;
  *) echo "build_server.sh: set ANCHOR_ENABLE_CUDA to ON or OFF" >&2; exit 2 ;;
esac
# Warnings stay errors in CI's build; an image built with another distribution's compiler should
# not fail on a warning that compiler adds.
# shellcheck disable=SC2086  # cuda_args is two words on purpose
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DANCHOR_WERROR=OFF \
  -DANCHOR_BUILD_TESTS=OFF -DANCHOR_BUILD_BENCH=OFF $cuda_args >/dev/null
cmake --build "$build" -j "$jobs" --target anchorserve anchorctl
install -d "$out/bin" "$out/share/anchorserve"
install -s "$build/bin/anchorserve" "$build/bin/anchorctl" "$out/bin/"
"$src/deploy/image/runtime_packages.sh" "$out/bin/anchorserve" "$out/bin/anchorctl" \
  >"$out/share/anchorserve/runtime-packages.txt"
install -m 0755 "$src/deploy/image/install_runtime.sh" "$out/share/anchorserve/"
echo "runtime packages: $(tr '\n' ' ' <"$out/share/anchorserve/runtime-packages.txt")"
