#!/usr/bin/env bash
# Session 11 call 2: kernel benchmark with cuDNN (section 1) on the bulk-copy build.
set -uo pipefail
W=$OUT/w; mkdir -p $W
save() { tar czf $OUT/out.tgz -C $W . ; }
nvidia-smi --query-gpu=name,clocks.max.sm,driver_version --format=csv > $W/machine.txt 2>&1; date -u >> $W/machine.txt
L=4096,8192,16384,32768,65536,131072
OUT=$W/suites timeout 400 scripts/gpu.sh run bench --q_heads=32 --kv_heads=8 --lengths=$L --sweep_thetas=8,12,15 --sweep_lengths=$L --sample_rows=128 --reps=3 > $W/bench.log 2>&1
echo "bench rc=$?" >> $W/summary.txt; save
