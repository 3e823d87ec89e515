#!/usr/bin/env bash
# Session 11 call 3: Qwen2.5-7B attention shape with cuDNN, ncu of the bulk-copy kernels,
# Llama-3.1-8B-shaped prefill vs transformers.
set -uo pipefail
B=$PWD/.gpu/bundle
W=$OUT/w; mkdir -p $W
save() { tar czf $OUT/out.tgz -C $W . ; }
nvidia-smi --query-gpu=name,clocks.max.sm,driver_version --format=csv > $W/machine.txt 2>&1; date -u >> $W/machine.txt
L=4096,8192,16384,32768,65536,131072
OUT=$W/suites timeout 150 scripts/gpu.sh run bench --q_heads=32 --kv_heads=8 --lengths=$L --sweep_thetas=8,12,15 --sweep_lengths=$L --sample_rows=128 --reps=3 > $W/bench_llama.log 2>&1
echo "bench llama rc=$?" >> $W/summary.txt; save
timeout 120 python3 bench/gpu/sdpa_baseline.py --heads=28,4 8192 32768 131072 > $W/sdpa_qwen.log 2>&1
echo "sdpa qwen rc=$?" >> $W/summary.txt
mkdir -p $W/qwen
timeout 120 $B/run anchor_kernel_bench --q_heads=28 --kv_heads=4 --lengths=8192,32768,131072 --sweep_thetas=8,12,15 --sweep_lengths=131072 --sample_rows=128 --reps=3 --sdpa_log=$W/sdpa_qwen.log --out=$W/qwen > $W/bench_qwen.log 2>&1
echo "bench qwen rc=$?" >> $W/summary.txt; save
timeout 200 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_baseline.py --shape=llama-3.1-8b --out=/tmp/l8b --tokens=8192,32768,131072 > $W/prefill_baseline.log 2>&1
echo "prefill baseline rc=$?" >> $W/summary.txt; save
timeout 150 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/l8b --tokens=8192,32768,131072 --dense --repeats=2 > $W/prefill_dense.log 2>&1
echo "prefill dense rc=$?" >> $W/summary.txt; save
timeout 60 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/l8b --tokens=131072 --theta=12 --repeats=1 > $W/prefill_theta12.log 2>&1
echo "prefill theta12 rc=$?" >> $W/summary.txt; save
ncu=/usr/local/cuda/bin/ncu
for spec in "AttentionKernel 1 2" "TwoHeadAnchorKernel 0 1"; do
  set -- $spec
  timeout 80 env LD_LIBRARY_PATH="$B/lib:/usr/local/cuda/lib64" $ncu --kernel-name regex:"$1" \
    --launch-skip "$2" --launch-count "$3" \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats \
    $B/bin/anchor_kernel_bench --lengths=32768 --reps=1 --sweep_lengths= --sample_rows=0 \
    --out=$W > $W/ncu_$1.txt 2>&1
  echo "ncu $1 rc=$?" >> $W/summary.txt
done
save
