#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/) with clang, ASan and UBSan into build-fuzz/ and runs each
# for a bounded time, starting from its seeds in fuzz/corpus/<target>/ (new inputs it finds go to
# build-fuzz/corpus/<target>/, not into the repository).
#   scripts/fuzz.sh [seconds_per_target] [target...]    # default 60 s, every target
# Exit 1 when a target crashes; the reproducer is build-fuzz/artifacts/<target>/crash-*
# (re-run it: build-fuzz/bin/<target> FILE). Per target it prints runs and executions/second.
# Environment: ANCHOR_FUZZ_BUILD_DIR (default build-fuzz), ANCHOR_BUILD_JOBS (default 2),
# ANCHOR_BUILD_LOCK (default /tmp/anchor-build.lock: the build waits for it, one build at a time
# on a shared machine; do not run this script under that lock), CLANGXX (default clang++-14).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
shift || true
build_dir=${ANCHOR_FUZZ_BUILD_DIR:-$root/build-fuzz}
all_targets=(tensor_wire_fuzzer attend_request_fuzzer attend_stream_assembler_fuzzer
  prefill_request_fuzzer safetensors_fuzzer model_config_fuzzer)
[ $# -gt 0 ] && targets=("$@") || targets=("${all_targets[@]}")

flags="-O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all"
cmake_args=(-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_COMPILER=${CLANGXX:-clang++-14}"
  "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=$flags"
  "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined"
  -DANCHOR_ENABLE_CUDA=OFF -DANCHOR_BUILD_TESTS=OFF -DANCHOR_BUILD_BENCH=OFF
  -DANCHOR_BUILD_FUZZERS=ON
  # clang warns about things gcc does not; the normal build holds the code to -Werror.
  -DANCHOR_WERROR=OFF)
if command -v ccache >/dev/null; then cmake_args+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
start=$SECONDS
cmake -S "$root" -B "$build_dir" "${cmake_args[@]}" >/dev/null
# One build at a time on a shared machine (scripts/test.sh's builds take the same lock).
flock "${ANCHOR_BUILD_LOCK:-/tmp/anchor-build.lock}" cmake --build "$build_dir" -j "${ANCHOR_BUILD_JOBS:-2}" \
  --target "${targets[@]}"
echo "fuzz: build took $((SECONDS - start)) s" >&2

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
failed=()
summary=()
for target in "${targets[@]}"; do
  corpus=$build_dir/corpus/$target
  artifacts=$build_dir/artifacts/$target
  mkdir -p "$corpus" "$artifacts"
  seeds=$root/fuzz/corpus/$target
  log=$build_dir/$target.log
  # -rss_limit_mb: the ASan build of a parser should stay far below it; a larger use is a bug.
  if ! "$build_dir/bin/$target" "$corpus" "$seeds" -max_total_time="$seconds" \
      -rss_limit_mb=2048 -max_len=65536 -timeout=10 -print_final_stats=1 \
      -artifact_prefix="$artifacts/" >"$log" 2>&1; then
    failed+=("$target")
    tail -60 "$log" >&2
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  summary+=("$(printf '%-32s %12s runs %8s exec/s' "$target" "${runs:-?}" "${rate:-?}")")
done
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in ${failed[*]} (reproducers under $build_dir/artifacts/)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets ran ${seconds} s each without a crash" >&2
