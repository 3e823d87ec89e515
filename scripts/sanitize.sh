#!/usr/bin/env bash
# Builds the CPU tree with sanitizers into its own directory and runs the tests that matter
# for that sanitizer:
#   scripts/sanitize.sh asan   # ASan + UBSan into build-asan/: the cpu and e2e labelled tests
#   scripts/sanitize.sh tsan   # TSan into build-tsan/: the batcher and chunked-writer tests
#                              # (ANCHOR_TSAN_GRPC=1: also the gRPC service and e2e tests, which
#                              # are not clean yet; scripts/sanitizers/README.md says why)
# Extra arguments go to ctest (e.g. -R Batcher). CPU only (no CUDA), no benchmarks, -O1 -g.
# Debian's gRPC, protobuf and Abseil are not instrumented; what that breaks and how each case is
# handled is written next to each measure in scripts/sanitizers/ (read those files).
# Environment: ANCHOR_SANITIZE_BUILD_DIR (default build-<mode>), ANCHOR_BUILD_JOBS (default
# nproc), ANCHOR_TEST_JOBS (default 2), ANCHOR_BUILD_LOCK (default /tmp/anchor-build.lock: the
# compiles take it, so do not run this script under that lock). ccache is used when installed.
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
  # clang: its -fsanitize-ignorelist leaves gRPC's header code uninstrumented like the rest of
  # gRPC (tsan_ignorelist.txt says why). Warnings are the normal build's business (clang warns
  # about things gcc does not), so they are not errors here.
  compiler=${CLANGXX:-clang++-14}
  extra_cmake=(-DCMAKE_CXX_COMPILER="$compiler" -DANCHOR_WERROR=OFF)
  san_flags="-fsanitize=thread -fsanitize-ignorelist=$supp_dir/tsan_ignorelist.txt"
  # Abseil's synchronization lives in an uninstrumented shared library: the wrappers in
  # scripts/sanitizers/tsan_absl_sync.cc tell TSan about its locks (that file says why and how).
  # Compiled here and linked into every executable with --wrap for each symbol it wraps.
  mkdir -p "$build_dir"
  shim=$build_dir/tsan_absl_sync.o
  flock "$lock" "$compiler" -std=c++20 $common_flags $san_flags -c "$supp_dir/tsan_absl_sync.cc" \
    -o "$shim"
  wraps=""
  while read -r symbol; do
    wraps="$wraps,--wrap=$symbol"
  done < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$supp_dir/tsan_absl_wrapped_symbols.txt")
  link_flags="$san_flags -Wl${wraps} $shim -labsl_synchronization"
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
  # ignore_noninstrumented_modules: no reports from libc calls (memmove, epoll) made inside the
  # uninstrumented libraries, whose own synchronization TSan cannot see (README.md here).
  export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:ignore_noninstrumented_modules=1:suppressions=$supp_dir/tsan.supp"
  # The batcher (worker thread, queue, deadlines, cancellation) and the chunked writer: clean.
  # Instrumented code runs several times slower: longer per-test limits than scripts/test.sh.
  ctest --output-on-failure --timeout 1800 -j "${ANCHOR_TEST_JOBS:-2}" -L cpu \
    -R '^(BatcherTest|GenericBatcherTest|DecideBatchTest|ChunkedTensorWriterTest)[.]' "$@"
  # The gRPC reactors (in process and in the real server) are not clean yet: gRPC's callback
  # machinery is partly compiled into our binaries but synchronized inside the uninstrumented
  # libgrpc, so TSan reports its hand-overs (README.md here). ANCHOR_TSAN_GRPC=1 runs them.
  if [ "${ANCHOR_TSAN_GRPC:-0}" = 1 ]; then
    ctest --output-on-failure --timeout 1800 -j "${ANCHOR_TEST_JOBS:-2}" -L cpu \
      -R '^AttentionServiceTest[.]' "$@"
    ctest --output-on-failure --timeout 1800 -j "${ANCHOR_TEST_JOBS:-2}" -L e2e "$@"
  fi
fi
echo "sanitize $mode: tests took $((SECONDS - start)) s" >&2
