#!/usr/bin/env bash
# Builds ThreadSanitizer-instrumented Abseil and gRPC from Debian's own source packages (the
# versions installed on this machine, with Debian's patches) into a prefix that
# scripts/sanitize.sh tsan builds against:
#   scripts/sanitizers/build_tsan_deps.sh [PREFIX]     # default build-tsan-deps/prefix
# TSan only sees synchronization in code it instrumented; with the distribution's plain builds
# every hand-over inside gRPC's completion queues and Abseil's mutexes looks like a data race
# (README.md here). Static, position-independent libraries, clang 14, -O1 with line tables.
# A finished prefix is reused while the versions and flags match (its stamp file). No root
# needed: the source packages come through a private apt state directory (apt verifies them
# against the archive's signed Sources index). Takes about 7 minutes on 2 cores, most of it
# gRPC. Environment: CLANG (default clang-14), CLANGXX (default clang++-14), ANCHOR_BUILD_JOBS
# (default nproc), ANCHOR_BUILD_LOCK (default /tmp/anchor-build.lock, taken by the compiles).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
prefix=${1:-$root/build-tsan-deps/prefix}
work=$(dirname "$prefix")
cc=${CLANG:-clang-14}
cxx=${CLANGXX:-clang++-14}
jobs=${ANCHOR_BUILD_JOBS:-$(nproc)}
lock=${ANCHOR_BUILD_LOCK:-/tmp/anchor-build.lock}

source_version() { dpkg-query -W -f='${source:Version}' "$1"; }
absl_version=$(source_version libabsl-dev)
grpc_version=$(source_version libgrpc++-dev)
san_flags="-fsanitize=thread -O1 -gline-tables-only -fno-omit-frame-pointer"
stamp="abseil=$absl_version grpc=$grpc_version compiler=$("$cxx" --version | head -1) flags=$san_flags"
if [ -f "$prefix/stamp" ] && [ "$(cat "$prefix/stamp")" = "$stamp" ]; then
  echo "build_tsan_deps: $prefix is current ($stamp)" >&2
  exit 0
fi
rm -rf "$prefix" "$work/src" "$work/build-abseil" "$work/build-grpc"
mkdir -p "$work/src" "$work/apt/parts" "$work/apt/lists/partial" "$work/apt/cache/archives/partial"

# deb-src entries for the same archives as this machine's deb entries.
apt_sources=$work/apt/sources.list
: >"$apt_sources"
if [ -f /etc/apt/sources.list ]; then
  sed -n 's/^deb \(.*\)/deb-src \1/p' /etc/apt/sources.list >>"$apt_sources"
fi
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  # deb822 stanzas: only the Debian/Ubuntu archives' (deb) stanzas, turned into deb-src.
  awk 'BEGIN { RS = ""; ORS = "\n\n" } /(^|\n)Types:[^\n]*deb/ && /debian|ubuntu/ {
         sub(/Types:[^\n]*/, "Types: deb-src"); print }' "$f" >"$work/apt/parts/$(basename "$f")"
done
apt_args=(-q -o Dir::Etc::SourceList="$apt_sources" -o Dir::Etc::SourceParts="$work/apt/parts"
  -o Dir::State::Lists="$work/apt/lists" -o Dir::Cache="$work/apt/cache" -o Debug::NoLocking=1)
apt-get "${apt_args[@]}" update >/dev/null
(cd "$work/src" && apt-get "${apt_args[@]}" source "abseil=$absl_version" "grpc=$grpc_version" \
  2>&1 | grep -v '^W: Download is performed unsandboxed' >&2)
absl_src=$(find "$work/src" -maxdepth 1 -type d -name 'abseil-*' | head -1)
grpc_src=$(find "$work/src" -maxdepth 1 -type d -name 'grpc-*' | head -1)

common=(-G Ninja -DCMAKE_BUILD_TYPE=None -DCMAKE_C_COMPILER="$cc" -DCMAKE_CXX_COMPILER="$cxx"
  "-DCMAKE_C_FLAGS=$san_flags" "-DCMAKE_CXX_FLAGS=$san_flags" -DCMAKE_CXX_STANDARD=17
  -DBUILD_SHARED_LIBS=OFF -DCMAKE_POSITION_INDEPENDENT_CODE=ON -DCMAKE_INSTALL_PREFIX="$prefix"
  -DCMAKE_INSTALL_LIBDIR=lib)
# grpc and grpc_unsecure (and grpc++/grpc++_unsecure) compile the same files with the same
# flags: ccache turns the second compile of each into a cache hit.
if command -v ccache >/dev/null; then
  common+=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi

start=$SECONDS
cmake -S "$absl_src" -B "$work/build-abseil" "${common[@]}" -DBUILD_TESTING=OFF >/dev/null
flock "$lock" cmake --build "$work/build-abseil" -j "$jobs" --target install >/dev/null
echo "build_tsan_deps: abseil $absl_version took $((SECONDS - start)) s" >&2

start=$SECONDS
cmake -S "$grpc_src" -B "$work/build-grpc" "${common[@]}" -DCMAKE_PREFIX_PATH="$prefix" \
  -DgRPC_INSTALL=ON -DgRPC_BUILD_TESTS=OFF -DgRPC_BUILD_CSHARP_EXT=OFF \
  -DgRPC_ABSL_PROVIDER=package -DgRPC_CARES_PROVIDER=package -DgRPC_PROTOBUF_PROVIDER=package \
  -DgRPC_RE2_PROVIDER=package -DgRPC_SSL_PROVIDER=package -DgRPC_ZLIB_PROVIDER=package \
  -DgRPC_BUILD_GRPC_CPP_PLUGIN=ON -DgRPC_BUILD_GRPC_CSHARP_PLUGIN=OFF \
  -DgRPC_BUILD_GRPC_NODE_PLUGIN=OFF -DgRPC_BUILD_GRPC_OBJECTIVE_C_PLUGIN=OFF \
  -DgRPC_BUILD_GRPC_PHP_PLUGIN=OFF -DgRPC_BUILD_GRPC_PYTHON_PLUGIN=OFF \
  -DgRPC_BUILD_GRPC_RUBY_PLUGIN=OFF >/dev/null
flock "$lock" cmake --build "$work/build-grpc" -j "$jobs" --target install >/dev/null
echo "build_tsan_deps: grpc $grpc_version took $((SECONDS - start)) s" >&2

echo "$stamp" >"$prefix/stamp"
rm -rf "$work/build-abseil" "$work/build-grpc" "$work/src"
