#!/usr/bin/env bash
# Session 13, last device call (asked for an H200): the GPU suites and the continuation checks on
# the final build, and the dense prefill of short prompts (1k-8k tokens, one request at a time) to
# size what batching short prompts could gain. Run from the repository root with OUT set.
# The helpers it defined (save, step, sample, serve, scrape) and its set-up (bundle path, log
# folder, machine.txt, environment) moved to bench/gpu/device_call.sh afterwards; it sources it.
set -uo pipefail
source bench/gpu/device_call.sh
OUT=$W/suites timeout 140 scripts/gpu.sh run tests > $W/tests.log 2>&1; step tests $?
timeout 60 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_baseline.py --shape=llama-3.1-8b --out=/tmp/l8b --tokens=1024,2048,4096,8192 > $W/prefill_baseline_short.log 2>&1; step baseline_short $?
timeout 60 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/l8b --tokens=1024,2048,4096,8192 --dense --repeats=3 > $W/prefill_short.log 2>&1; step short $?
serve /tmp/l8b server_l8b_check.log
timeout 150 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_check.py --target=127.0.0.1:$PORT --model=/tmp/l8b --tokens=1024 > $W/check_l8b.log 2>&1; step check_l8b $?
kill -TERM $PID; wait $PID
python3 scripts/make_tiny_model.py --preset=llama3-gpu-tiny --out=/tmp/llama3-gpu-tiny > /dev/null
python3 scripts/make_tiny_model.py --preset=qwen2-gpu-tiny --out=/tmp/qwen2-gpu-tiny > /dev/null
for m in llama3-gpu-tiny qwen2-gpu-tiny; do
  serve /tmp/$m server_$m.log
  timeout 60 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_check.py --target=127.0.0.1:$PORT --model=/tmp/$m --tokens=512 > $W/check_$m.log 2>&1; step check_$m $?
  kill -TERM $PID; wait $PID
done
