#!/usr/bin/env bash
# Builds the CPU tree with sanitizers into its own directory and runs the tests that matter
# for that sanitizer:
#   scripts/sanitize.sh asan   # ASan + UBSan into build-asan/: the cpu and e2e labelled tests
#   scripts/sanitize.sh tsan   # TSan into build-tsan/: the batcher, the chunked writer, the
#                              # in-process gRPC service and the end-to-end tests, against
#                              # TSan-built Abseil and gRPC (scripts/sanitizers/build_tsan_deps.sh,
#                              # built once into build-tsan-deps/, about 7 minutes on 2 cores)
# Extra arguments go to ctest (e.g. -R Batcher). CPU only (no CUDA), no benchmarks, -O1 -g.
# What the remaining uninstrumented libraries (protobuf, libstdc++, BLIS, OpenSSL) need is
# written next to each measure in scripts/sanitizers/ (README.md there).
# Environment: ANCHOR_SANITIZE_BUILD_DIR (default build-<mode>), ANCHOR_TSAN_DEPS_PREFIX (default
# build-tsan-deps/prefix), ANCHOR_BUILD_JOBS (default nproc), ANCHOR_TEST_JOBS (default 2),
# ANCHOR_BUILD_LOCK (default /tmp/anchor-build.lock: the compiles take it, so do not run this
# script under that lock). ccache is used when installed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-}
case "$mode" in
  asan | tsan) shift ;;
  *) echo "usage: scripts/sanitize.sh asan|tsan [ctest args...]" >&2; exit 2 ;;
esac
build_dir=${ANCHOR_SANITIZE_BUILD_DIR:-$root/build-$mode}
supp_dir=$root/scripts/sanitizers
# Compiles wait for this lock: one build at a time on a machine shared by several checkouts (the
# tests run outside it).
lock=${ANCHOR_BUILD_LOCK:-/tmp/anchor-build.lock}

common_flags="-O1 -g -fno-omit-frame-pointer"
extra_cmake=()
if [ "$mode" = asan ]; then
  # Every UBSan finding is fatal (no recovery), like an ASan one.
  san_flags="-fsanitize=address,undefined -fno-sanitize-recover=all"
  link_flags="$san_flags"
else
  # Abseil and gRPC synchronize the reactors, the batcher and every lock of ours; TSan only sees
  # that in code it instrumented, so both are built from Debian's sources with TSan (same
  # versions and patches as the installed packages) and linked statically from this prefix.
  # clang 14 like that build; warnings are the normal build's business (clang warns about things
  # gcc does not), so they are not errors here.
  deps_prefix=${ANCHOR_TSAN_DEPS_PREFIX:-$root/build-tsan-deps/prefix}
  "$supp_dir/build_tsan_deps.sh" "$deps_prefix"
  compiler=${CLANGXX:-clang++-14}
  extra_cmake=(-DCMAKE_CXX_COMPILER="$compiler" -DANCHOR_WERROR=OFF
    -DCMAKE_PREFIX_PATH="$deps_prefix" -Dabsl_DIR="$deps_prefix/lib/cmake/absl"
    -DgRPC_DIR="$deps_prefix/lib/cmake/grpc")
  san_flags="-fsanitize=thread"
  link_flags="$san_flags"
fi

cmake_args=(-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
  "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=$common_flags"
  "-DCMAKE_CXX_FLAGS=$san_flags"
  "-DCMAKE_EXE_LINKER_FLAGS=$link_flags"
  "-DCMAKE_SHARED_LINKER_FLAGS=$link_flags"
  -DANCHOR_ENABLE_CUDA=OFF -DANCHOR_BUILD_BENCH=OFF "${extra_cmake[@]}")
if command -v ccache >/dev/null; then cmake_args+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi

start=$SECONDS
cmake -S "$root" -B "$build_dir" "${cmake_args[@]}" >/dev/null
flock "$lock" cmake --build "$build_dir" -j "${ANCHOR_BUILD_JOBS:-$(nproc)}"
echo "sanitize $mode: build took $((SECONDS - start)) s" >&2

start=$SECONDS
cd "$build_dir"
if [ "$mode" = asan ]; then
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  ctest --output-on-failure --timeout 1800 -j "${ANCHOR_TEST_JOBS:-2}" -L 'cpu|e2e' "$@"
else
  # ignore_noninstrumented_modules: no reports from libc calls (memcpy, epoll) made inside the
  # libraries still uninstrumented (OpenSSL, c-ares, BLIS), whose own synchronization TSan
  # cannot see (README.md here).
  # report_thread_leaks=0: gRPC joins its internal threads (timer manager, executors) lazily or
  # detaches them at shutdown, so a short-lived client such as anchorctl can exit with one that
  # ended but was never joined; that is a thread-lifetime report, not a race. Our own threads are
  # std::threads, which end the program when destroyed unjoined.
  export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:ignore_noninstrumented_modules=1:report_thread_leaks=0:suppressions=$supp_dir/tsan.supp"
  # The concurrent code: the batcher (worker thread, queue, deadlines, cancellation), the
  # chunked writer, the server's reactors in process, and the real server end to end.
  # Instrumented code runs several times slower: longer per-test limits than scripts/test.sh.
  ctest --output-on-failure --timeout 1800 -j "${ANCHOR_TEST_JOBS:-2}" -L cpu \
    -R '^(BatcherTest|GenericBatcherTest|DecideBatchTest|ChunkedTensorWriterTest|AttentionServiceTest)[.]' "$@"
  ctest --output-on-failure --timeout 1800 -j "${ANCHOR_TEST_JOBS:-2}" -L e2e "$@"
fi
echo "sanitize $mode: tests took $((SECONDS - start)) s" >&2
