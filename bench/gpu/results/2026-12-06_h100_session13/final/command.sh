#!/usr/bin/env bash
# Session 13's last device call, on the build of the final commit: the GPU suites, the
# continuation checks (8B shape, tiny models), transformers' prefill and ours (Llama-3.1-8B shape,
# dense, 8k-128k, SM clock and power sampled), the service end to end (K/V ring reused by the
# second request; the pinned-memory gauge scraped), theta 12 and the structured kernel bench at
# 128k for the projection, the Qwen2.5-7B shape against transformers, and the elementwise kernels
# alone. Run from the repository root with OUT set.
# The helpers it defined (save, step, sample, serve, scrape) and its set-up (bundle path, log
# folder, machine.txt, environment) moved to bench/gpu/device_call.sh afterwards; it sources it.
set -uo pipefail
source bench/gpu/device_call.sh
OUT=$W/suites timeout 140 scripts/gpu.sh run tests > $W/tests.log 2>&1; step tests $?
sample clocks_baseline.csv
timeout 150 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_baseline.py --shape=llama-3.1-8b --out=/tmp/l8b --tokens=8192,32768,65536,131072 > $W/prefill_baseline.log 2>&1; step baseline $?
kill $SAMPLER
sample clocks_dense.csv
timeout 120 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/l8b --tokens=8192,32768,65536,131072 --dense --repeats=2 --per_layer > $W/prefill_dense.log 2>&1; step dense $?
kill $SAMPLER
serve /tmp/l8b server_l8b_check.log
timeout 150 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_check.py --target=127.0.0.1:$PORT --model=/tmp/l8b --tokens=1024 > $W/check_l8b.log 2>&1; step check_l8b $?
kill -TERM $PID; wait $PID
serve /tmp/l8b server_l8b_e2e.log
scrape metrics.txt
for spec in 131072:all:1 131072:all:2 131072:none:1 32768:all:1 32768:all:2 32768:none:1; do
  IFS=: read n kv r <<< "$spec"
  timeout 60 $B/run anchorctl prefill --target=127.0.0.1:$PORT --logits=topk:1 --random_ids=$n --dense --kv_layers=$kv > $W/e2e_${n}_${kv}_$r.log 2>&1; step e2e_${n}_${kv}_$r $?
  echo "after $spec" >> $W/metrics.txt; scrape metrics.txt
done
kill -TERM $PID; wait $PID
timeout 60 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/l8b --tokens=131072 --theta=12 --repeats=2 > $W/prefill_theta12.log 2>&1; step theta12 $?
timeout 60 $B/run anchor_kernel_bench --q_heads=32 --kv_heads=8 --lengths=131072 --sweep_lengths= --sample_rows=16 --reps=5 --out=$W/kernel128k > $W/kernel128k.log 2>&1; step kernel128k $?
python3 scripts/make_tiny_model.py --preset=llama3-gpu-tiny --out=/tmp/llama3-gpu-tiny > /dev/null
python3 scripts/make_tiny_model.py --preset=qwen2-gpu-tiny --out=/tmp/qwen2-gpu-tiny > /dev/null
for m in llama3-gpu-tiny qwen2-gpu-tiny; do
  serve /tmp/$m server_$m.log
  timeout 60 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_check.py --target=127.0.0.1:$PORT --model=/tmp/$m --tokens=512 > $W/check_$m.log 2>&1; step check_$m $?
  kill -TERM $PID; wait $PID
done
timeout 30 $B/run anchor_layer_ops_bench --lengths=32768,131072 > $W/layer_ops.log 2>&1; step layer_ops $?
rm -rf /tmp/l8b
timeout 120 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_baseline.py --shape=qwen2.5-7b --out=/tmp/q7b --tokens=32768,131072 > $W/qwen_baseline.log 2>&1; step qwen_baseline $?
timeout 90 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/q7b --tokens=32768,131072 --dense --repeats=2 > $W/qwen_dense.log 2>&1; step qwen_dense $?
