#!/usr/bin/env bash
# Session 11 call 1: bulk (TMA) K/V tile copies vs row copies (attention and anchor kernels),
# dense-kernel diagnostics, GPU suites, then the kernel benchmark with cuDNN of the new build.
set -uo pipefail
start=$(date +%s)
B=$PWD/.gpu/bundle
W=$OUT/w; mkdir -p $W
save() { tar czf $OUT/out.tgz -C $W . ; }
nvidia-smi --query-gpu=name,clocks.max.sm,driver_version --format=csv > $W/machine.txt 2>&1; date -u >> $W/machine.txt
timeout 150 $B/run anchor_attention_kernel_test > $W/kernel_test.log 2>&1
echo "kernel_test rc=$? $(grep -c '^\[       OK' $W/kernel_test.log) ok $(grep -c '^\[  FAILED' $W/kernel_test.log) failed" >> $W/summary.txt; save
AB="--dense=8192,32768,131072 --sparse=32768,131072 --densities=0.05,0.3 --check_rows=16"
timeout 90 $B/run anchor_attention_microbench_base $AB > $W/ab_base_1.log 2>&1; echo "micro base rc=$?" >> $W/summary.txt
timeout 150 $B/run anchor_attention_microbench $AB --copy=both > $W/ab_new_1.log 2>&1; echo "micro new rc=$?" >> $W/summary.txt
for v in NO_SOFTMAX NO_PINGPONG; do
  timeout 60 $B/run anchor_attention_microbench_$v --dense=8192,32768,131072 --sparse= --check_rows=16 > $W/diag_$v.log 2>&1
  echo "diag $v rc=$?" >> $W/summary.txt
done
save
KB="--q_heads=32 --kv_heads=8 --lengths=32768,131072 --sweep_lengths= --sample_rows=16 --reps=5"
for rep in 1; do
  for v in base new; do
    exe=anchor_kernel_bench; [ $v = base ] && exe=${exe}_base
    mkdir -p $W/kb_${v}_$rep
    timeout 90 $B/run $exe $KB --out=$W/kb_${v}_$rep > $W/kb_${v}_$rep.log 2>&1; echo "kb $v $rep rc=$?" >> $W/summary.txt
  done
  save
done
OUT=$W/suites timeout 200 scripts/gpu.sh run tests > $W/tests.log 2>&1; echo "tests rc=$?" >> $W/summary.txt
cp $W/suites/tests/summary.txt $W/tests_summary.txt 2>/dev/null; save
save
