#!/usr/bin/env bash
# One device run for the attention kernels: a smoke test of the production kernels (stops here if
# it fails or hangs), the GPU tests, then the microbenchmark, then the cuDNN (torch SDPA) baseline
# on the same shapes, all logs under $OUT (default ./attention_out).
#   bench/gpu/run_attention_device.sh BUNDLE_DIR [microbench args...]
# BUNDLE_DIR is made by scripts/gpu_bundle.sh from anchor_attention_kernel_test and
# anchor_attention_microbench (and optionally anchor_gpu_tests, run when present).
# SDPA_LENGTHS (space-separated) limits the baseline to those N (default: its own list).
set -uo pipefail
bundle=$1; shift
out=${OUT:-./attention_out}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv \
  > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
timeout 60 "$bundle/run" anchor_attention_kernel_test --gtest_color=no \
  --gtest_filter='*Production*:AttentionKernelDense.MixedBatchBf16D128TokenMajorGqa4' \
  > "$out/smoke.log" 2>&1
smoke=$?
echo "smoke exit: $smoke"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure" "$out/smoke.log" | head -20
[ "$smoke" -eq 0 ] || { tail -40 "$out/smoke.log"; exit 1; }
timeout 200 "$bundle/run" anchor_attention_kernel_test --gtest_color=no > "$out/tests.log" 2>&1
echo "tests exit: $?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|checked|Failure|error" "$out/tests.log" | head -60
if [ -x "$bundle/anchor_gpu_tests" ]; then
  timeout 200 "$bundle/run" anchor_gpu_tests --gtest_color=no > "$out/gpu_tests.log" 2>&1
  echo "anchor_gpu_tests exit: $?"
  grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|tests ran" "$out/gpu_tests.log" | head -30
fi
timeout 240 "$bundle/run" anchor_attention_microbench "$@" > "$out/microbench.log" 2>&1
echo "microbench exit: $?"
# shellcheck disable=SC2086
PYTHONUNBUFFERED=1 timeout 150 python3 "$here/sdpa_baseline.py" ${SDPA_LENGTHS:-} \
  > "$out/sdpa.log" 2>&1
echo "sdpa exit: $?"
sed -n '/== summary ==/,$p' "$out/microbench.log"
tail -3 "$out/microbench.log" | grep -v "^sparse\|^dense" || true
cat "$out/sdpa.log"
