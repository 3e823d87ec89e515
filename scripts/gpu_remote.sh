#!/usr/bin/env bash
# Runs on the GPU machine (see scripts/gpu_check.sh): the CUDA backend tests, then the cuDNN
# baseline (torch SDPA, bench/gpu/sdpa_baseline.py) and anchor_kernel_bench on the same shapes,
# all logs and result files under $OUT. Each step has its own time limit so that a hang or crash
# in one still leaves the others' results.
#
#   scripts/gpu_remote.sh BUNDLE_DIR [anchor_kernel_bench args...]
# Environment: OUT (default ./gpu_out), SKIP_TESTS=1, SKIP_BENCH=1, TEST_FILTER (gtest filter),
# LENGTHS (for the sdpa baseline; default the benchmark's), NCU=1 (profile the anchor and stripe
# kernels once at N = 32k with Nsight Compute, when it is installed).
set -uo pipefail
bundle=${1:?usage: gpu_remote.sh BUNDLE_DIR [bench args...]}
shift
out=${OUT:-./gpu_out}
mkdir -p "$out"
root=$(cd "$(dirname "$0")/.." && pwd)
lengths=${LENGTHS:-4096 8192 16384 32768 65536 131072}

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version,memory.total \
    --format=csv,noheader 2>&1
} | tee "$out/machine.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 60 "$bundle/run" anchor_cuda_plan_tests --gtest_color=no > "$out/plan_tests.log" 2>&1
  echo "plan tests exit: $?"
  timeout 240 "$bundle/run" anchor_gpu_tests --gtest_color=no \
    --gtest_filter="${TEST_FILTER:-*}" > "$out/tests.log" 2>&1
  echo "gpu tests exit: $?"
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|Failure|error|Expected|Which is|wrong|off;|selected" \
    "$out/tests.log" | cut -c1-400 | head -80
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout 150 python3 "$root/bench/gpu/sdpa_baseline.py" $lengths \
    > "$out/sdpa.log" 2>&1
  echo "sdpa exit: $?"
  cat "$out/sdpa.log"
  timeout 300 "$bundle/run" anchor_kernel_bench --out="$out" --sdpa_log="$out/sdpa.log" "$@" \
    > "$out/bench.log" 2>&1
  echo "bench exit: $?"
  grep -v "^|" "$out/bench.log" | tail -40
  sed -n '/== summary ==/,$p' "$out/bench.log"
fi

if [ "${NCU:-0}" = 1 ]; then
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -n "$ncu" ]; then
    LD_LIBRARY_PATH="$bundle/lib" timeout 150 "$ncu" --kernel-name regex:"AnchorKernel|StripeScoreKernel|WgmmaStripeKernel" --launch-count 2 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \
      --section MemoryWorkloadAnalysis \
      "$bundle/anchor_kernel_bench" --lengths=32768 --reps=1 --sweep_lengths= \
      --sample_rows=0 --out=/tmp > "$out/ncu.txt" 2>&1
    echo "ncu exit: $?"
    grep -E "Kernel|Throughput|Pipe|Occupancy|Registers|Duration|Block Limit|L2|Shared|Hit" \
      "$out/ncu.txt" | head -90
  else
    echo "ncu not found"
  fi
fi
