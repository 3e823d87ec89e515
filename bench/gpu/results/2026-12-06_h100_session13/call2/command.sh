#!/usr/bin/env bash
# Session 13's second device call, after fusing each residual add with the RMSNorm after it:
# the layer-op and prefill-engine GPU tests, the elementwise kernels alone, transformers' prefill
# and ours (dense, 8k-128k) with the SM clock and power sampled, theta 12 at 128k, and the
# continuation checks. Run from the repository root with OUT set.
# The helpers it defined (save, step, sample, serve, scrape) and its set-up (bundle path, log
# folder, machine.txt, environment) moved to bench/gpu/device_call.sh afterwards; it sources it.
set -uo pipefail
source bench/gpu/device_call.sh
for t in anchor_layer_ops_tests anchor_cuda_prefill_tests anchor_device_fault_test; do
  timeout 60 $B/run $t > $W/$t.log 2>&1; step $t $?
done
timeout 40 $B/run anchor_layer_ops_bench --lengths=32768,131072 > $W/layer_ops.log 2>&1; step layer_ops $?
sample clocks_baseline.csv
timeout 150 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_baseline.py --shape=llama-3.1-8b --out=/tmp/l8b --tokens=8192,32768,65536,131072 > $W/prefill_baseline.log 2>&1; step baseline $?
kill $SAMPLER
sample clocks_dense.csv
timeout 120 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/l8b --tokens=8192,32768,65536,131072 --dense --repeats=2 --per_layer > $W/prefill_dense.log 2>&1; step dense $?
kill $SAMPLER
serve /tmp/l8b server_l8b_check.log
timeout 150 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_check.py --target=127.0.0.1:$PORT --model=/tmp/l8b --tokens=1024 > $W/check_l8b.log 2>&1; step check_l8b $?
kill -TERM $PID; wait $PID
timeout 60 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/l8b --tokens=131072 --theta=12 --repeats=1 > $W/prefill_theta12.log 2>&1; step theta12 $?
python3 scripts/make_tiny_model.py --preset=llama3-gpu-tiny --out=/tmp/llama3-gpu-tiny > /dev/null
python3 scripts/make_tiny_model.py --preset=qwen2-gpu-tiny --out=/tmp/qwen2-gpu-tiny > /dev/null
for m in llama3-gpu-tiny qwen2-gpu-tiny; do
  serve /tmp/$m server_$m.log
  timeout 60 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_check.py --target=127.0.0.1:$PORT --model=/tmp/$m --tokens=512 > $W/check_$m.log 2>&1; step check_$m $?
  kill -TERM $PID; wait $PID
done
