#!/usr/bin/env bash
# Session 13: the two benches whose timing loop moved to bench_util.h's MedianEventMs (and the
# layer-ops bench's absl flags), run once to see them work on the GPU. Repository root, OUT set.
set -uo pipefail
source bench/gpu/device_call.sh
timeout 30 $B/run anchor_layer_ops_bench --lengths=8192,32768 --reps=3 > $W/layer_ops.log 2>&1; step layer_ops $?
timeout 60 $B/run anchor_attention_microbench --dense=8192,32768 --sparse=32768 --densities=0.1 --check_rows=32 > $W/microbench.log 2>&1; step microbench $?
