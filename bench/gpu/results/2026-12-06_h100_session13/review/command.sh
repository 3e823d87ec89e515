#!/usr/bin/env bash
# Session 13, after the review: the CUDA prefill engine tests once the pinned ring's growth and
# release moved into ReserveHostRing/ReleaseHostRing, and the layer-ops bench after its flags were
# read without an options copy. Repository root, OUT set.
set -uo pipefail
source bench/gpu/device_call.sh
timeout 60 $B/run anchor_cuda_prefill_tests > $W/anchor_cuda_prefill_tests.log 2>&1; step anchor_cuda_prefill_tests $?
timeout 30 $B/run anchor_layer_ops_bench --lengths=8192,32768 --reps=3 > $W/layer_ops.log 2>&1; step layer_ops $?
