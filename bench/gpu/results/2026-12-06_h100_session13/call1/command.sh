#!/usr/bin/env bash
# Session 13's device call: GPU suites, the continuation checks (8B shape, tiny models), the
# elementwise kernels alone, the 128k dense prefill and the dense kernel alone with the SM clock
# and power sampled, an Nsight Systems kernel summary of a 32k prefill when nsys is there, then
# the Qwen2.5-7B-shape prefill vs transformers. Run from the repository root with OUT set.
# The helpers it defined (save, step, sample, serve, scrape) and its set-up (bundle path, log
# folder, machine.txt, environment) moved to bench/gpu/device_call.sh afterwards; it sources it.
set -uo pipefail
source bench/gpu/device_call.sh
OUT=$W/suites timeout 140 scripts/gpu.sh run tests > $W/tests.log 2>&1; step tests $?
python3 scripts/make_tiny_model.py --preset=llama3-gpu-tiny --out=/tmp/llama3-gpu-tiny > /dev/null
python3 scripts/make_tiny_model.py --preset=qwen2-gpu-tiny --out=/tmp/qwen2-gpu-tiny > /dev/null
timeout 60 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_baseline.py --shape=llama-3.1-8b --out=/tmp/l8b --tokens=1024 > $W/l8b_build.log 2>&1
serve /tmp/l8b server_l8b_check.log
timeout 150 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_check.py --target=127.0.0.1:$PORT --model=/tmp/l8b --tokens=1024 > $W/check_l8b.log 2>&1; step check_l8b $?
kill -TERM $PID; wait $PID
for m in llama3-gpu-tiny qwen2-gpu-tiny; do
  serve /tmp/$m server_$m.log
  timeout 60 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_check.py --target=127.0.0.1:$PORT --model=/tmp/$m --tokens=512 > $W/check_$m.log 2>&1; step check_$m $?
  kill -TERM $PID; wait $PID
done
timeout 40 $B/run anchor_layer_ops_bench --lengths=32768,131072 > $W/layer_ops.log 2>&1; step layer_ops $?
sample clocks_prefill128k.csv
timeout 90 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/l8b --tokens=131072 --dense --repeats=1 --per_layer > $W/prefill128k.log 2>&1; step prefill128k $?
kill $SAMPLER
sample clocks_kernel128k.csv
timeout 60 $B/run anchor_kernel_bench --q_heads=32 --kv_heads=8 --lengths=131072 --sweep_lengths= --sample_rows=16 --reps=5 --out=$W/kernel128k > $W/kernel128k.log 2>&1; step kernel128k $?
kill $SAMPLER
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
if [ -n "$NSYS" ]; then
  timeout 90 $NSYS profile -o /tmp/prefill32k --force-overwrite=true $B/run anchor_prefill_bench --engine=cuda --model=/tmp/l8b --tokens=32768 --dense > $W/nsys_run.log 2>&1
  timeout 40 $NSYS stats --report cuda_gpu_kern_sum --format csv -o $W/nsys32k /tmp/prefill32k.nsys-rep >> $W/nsys_run.log 2>&1; step nsys $?
fi
rm -rf /tmp/l8b
timeout 120 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_baseline.py --shape=qwen2.5-7b --out=/tmp/q7b --tokens=32768,131072 > $W/qwen_baseline.log 2>&1; step qwen_baseline $?
timeout 90 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/q7b --tokens=32768,131072 --dense --repeats=2 > $W/qwen_dense.log 2>&1; step qwen_dense $?
