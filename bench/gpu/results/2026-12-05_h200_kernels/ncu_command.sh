#!/usr/bin/env bash
# Session 2026-12-05 call 4: ncu profile of the attention (dense and sparse), anchor and stripe
# kernels at 32k, Llama shape, theta 12 (limiting factor per kernel for bench/RESULTS.md).
set -u
O=${OUT:?}/c4; mkdir -p "$O"
ncu=$(command -v ncu || true)
if [ -z "$ncu" ]; then
  for ncu in /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu; do [ -x "$ncu" ] && break; done
fi
echo "ncu: $ncu" > "$O/summary.txt"
B=$PWD/.gpu/bundle
for spec in "AttentionKernel 1 2" "TwoHeadAnchorKernel|WgmmaStripeKernel|CompactKernel|PoolKernel 0 4"; do
  set -- $spec
  name=$(echo "$1" | cut -c1-12)
  timeout 240 env LD_LIBRARY_PATH="$B/lib:/usr/local/cuda/lib64" "$ncu" --kernel-name regex:"$1" \
    --launch-skip "$2" --launch-count "$3" \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats \
    "$B/bin/anchor_kernel_bench" --lengths=32768 --reps=1 --sweep_lengths= --sample_rows=0 \
    --out="$O" > "$O/ncu_$name.txt" 2>&1
  echo "$1 rc=$?" >> "$O/summary.txt"
done
cp "$O/summary.txt" "$OUT/summary.txt"
tar czf "$OUT/c4.tgz" -C "$OUT" c4
