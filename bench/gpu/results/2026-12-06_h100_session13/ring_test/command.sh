#!/usr/bin/env bash
# Session 13: the CUDA prefill engine tests after they began checking the kept pinned ring's size
# (KeptPinnedHostBytes after each run). Repository root, OUT set.
set -uo pipefail
source bench/gpu/device_call.sh
timeout 60 $B/run anchor_cuda_prefill_tests > $W/anchor_cuda_prefill_tests.log 2>&1; step anchor_cuda_prefill_tests $?
