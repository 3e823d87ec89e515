#!/bin/bash
# One device call: GPU tests, the service suite (with the Prefill wire bench), then smaller groups.
set -u
export OUT_DIR=${OUT:-/tmp/out}
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT_DIR/gpu.txt" 2>&1
git_rev=$(cat .gpu/commit.txt 2>/dev/null)
echo "bundle commit $git_rev; $(date -u)" >> "$OUT_DIR/gpu.txt"
export OUT=gpu-out
timeout 200 scripts/gpu.sh run tests > "$OUT_DIR/tests.txt" 2>&1
timeout 120 scripts/gpu.sh run service > "$OUT_DIR/service.txt" 2>&1
timeout 230 scripts/gpu.sh run mass --n=32768,131072 --seeds=0 --groups=128:16,128:4 \
  --thetas=12,13,14 --targets=0.95 > "$OUT_DIR/mass.txt" 2>&1
date -u >> "$OUT_DIR/gpu.txt"
tar czf "$OUT_DIR/gpu-out.tgz" gpu-out
