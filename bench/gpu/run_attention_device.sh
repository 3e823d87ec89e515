#!/usr/bin/env bash
# One device run for the attention kernels: GPU tests, then the microbenchmark, then the cuDNN
# (torch SDPA) baseline on the same shapes, all logs under $OUT (default ./attention_out).
#   bench/gpu/run_attention_device.sh BUNDLE_DIR [microbench args...]
# BUNDLE_DIR is made by scripts/gpu_bundle.sh from anchor_attention_kernel_test and
# anchor_attention_microbench.
set -uo pipefail
bundle=$1; shift
out=${OUT:-./attention_out}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv \
  > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
timeout 240 "$bundle/run" anchor_attention_kernel_test --gtest_color=no > "$out/tests.log" 2>&1
echo "tests exit: $?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|checked|Failure|error" "$out/tests.log" | head -60
timeout 240 "$bundle/run" anchor_attention_microbench "$@" > "$out/microbench.log" 2>&1
echo "microbench exit: $?"
PYTHONUNBUFFERED=1 timeout 150 python3 "$here/sdpa_baseline.py" > "$out/sdpa.log" 2>&1
echo "sdpa exit: $?"
sed -n '/== summary ==/,$p' "$out/microbench.log"
tail -3 "$out/microbench.log" | grep -v "^sparse\|^dense" || true
cat "$out/sdpa.log"
