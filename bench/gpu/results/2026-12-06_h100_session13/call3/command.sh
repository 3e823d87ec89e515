#!/usr/bin/env bash
# Session 13's third device call, after keeping the pinned K/V ring between runs: the layer-op
# and prefill-engine GPU tests, the dense prefill at 32k and 128k (two runs each: the first
# allocates the ring, the second reuses it), and the service end to end at 128k with all K/V
# returned, twice. Run from the repository root with OUT set.
# The helpers it defined (save, step, sample, serve, scrape) and its set-up (bundle path, log
# folder, machine.txt, environment) moved to bench/gpu/device_call.sh afterwards; it sources it.
set -uo pipefail
source bench/gpu/device_call.sh
for t in anchor_layer_ops_tests anchor_cuda_prefill_tests anchor_device_fault_test; do
  timeout 60 $B/run $t > $W/$t.log 2>&1; step $t $?
done
timeout 60 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_baseline.py --shape=llama-3.1-8b --out=/tmp/l8b --tokens=1024 > $W/l8b_build.log 2>&1; step l8b_build $?
timeout 90 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/l8b --tokens=32768,131072 --dense --repeats=2 > $W/prefill_dense.log 2>&1; step dense $?
rm -f /tmp/port
$B/run anchorserve --backend=cuda --model=/tmp/l8b --grpc_port=0 --metrics_port=0 --port_file=/tmp/port \
  --prefill_memory_bytes=34359738368 > server_l8b.log 2>&1 &
PID=$!
for i in $(seq 1 120); do
  if [ -s /tmp/port ] && $B/run anchorctl health --target=127.0.0.1:$(head -1 /tmp/port | tr -dc 0-9) >/dev/null 2>&1; then break; fi
  sleep 0.5
done
PORT=$(head -1 /tmp/port | tr -dc 0-9)
for r in 1 2; do
  timeout 60 $B/run anchorctl prefill --target=127.0.0.1:$PORT --logits=topk:1 --random_ids=131072 --dense --kv_layers=all > $W/e2e_131072_all_$r.log 2>&1; step e2e_131072_all_$r $?
done
timeout 60 $B/run anchorctl prefill --target=127.0.0.1:$PORT --logits=topk:1 --random_ids=131072 --dense --kv_layers=none > $W/e2e_131072_none.log 2>&1; step e2e_131072_none $?
kill -TERM $PID; wait $PID
