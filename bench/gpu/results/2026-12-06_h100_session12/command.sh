#!/usr/bin/env bash
# Session 12 call A: GPU suites; Llama-8B-shape prefill vs transformers (8k-128k, GEMM split);
# the service end to end over loopback; theta 12; MLP chunk 16384; 8B accuracy + continuation.
set -uo pipefail
B=$PWD/.gpu/bundle
W=$OUT/w; mkdir -p $W
save() { tar czf $OUT/out.tgz -C $W . ; }
export ANCHORSERVE_CLIENT_GEN_DIR=$PWD/client/python/anchorserve_client/_gen
nvidia-smi --query-gpu=name,clocks.max.sm,driver_version --format=csv > $W/machine.txt 2>&1; date -u >> $W/machine.txt
OUT=$W/suites timeout 130 scripts/gpu.sh run tests > $W/tests.log 2>&1
echo "tests rc=$? $(date -u +%T)" >> $W/summary.txt; save
timeout 110 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_baseline.py --shape=llama-3.1-8b --out=/tmp/l8b --tokens=8192,32768,65536,131072 > $W/prefill_baseline.log 2>&1
echo "prefill baseline rc=$? $(date -u +%T)" >> $W/summary.txt; save
timeout 100 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/l8b --tokens=8192,32768,65536,131072 --dense --repeats=2 > $W/prefill_dense.log 2>&1
echo "prefill dense rc=$? $(date -u +%T)" >> $W/summary.txt; save
serve() {  # serve MODEL LOG: starts anchorserve, waits until it answers; sets PORT and PID
  rm -f /tmp/port
  $B/run anchorserve --backend=cuda --model=$1 --grpc_port=0 --metrics_port=0 --port_file=/tmp/port \
    --prefill_memory_bytes=34359738368 > $2 2>&1 &
  PID=$!
  for i in $(seq 1 120); do
    if [ -s /tmp/port ] && $B/run anchorctl health --target=127.0.0.1:$(head -1 /tmp/port | tr -dc 0-9) >/dev/null 2>&1; then break; fi
    sleep 0.5
  done
  PORT=$(head -1 /tmp/port | tr -dc 0-9)
}
serve /tmp/l8b $W/server_l8b.log
echo "server l8b port=$PORT $(date -u +%T)" >> $W/summary.txt
for spec in "32768 none" "32768 all" "131072 none" "131072 all"; do
  set -- $spec
  timeout 60 $B/run anchorctl prefill --target=127.0.0.1:$PORT --logits=topk:1 --random_ids=$1 --dense --kv_layers=$2 > $W/e2e_$1_$2.log 2>&1
  echo "e2e $1 $2 rc=$? $(date -u +%T)" >> $W/summary.txt; save
done
kill -TERM $PID; wait $PID; echo "server l8b exit=$? $(date -u +%T)" >> $W/summary.txt
timeout 50 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/l8b --tokens=131072 --theta=12 --repeats=1 > $W/prefill_theta12.log 2>&1
echo "prefill theta12 rc=$? $(date -u +%T)" >> $W/summary.txt; save
timeout 60 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/l8b --tokens=131072 --dense --repeats=2 --mlp_chunk_rows=16384 > $W/prefill_dense_chunk16384.log 2>&1
echo "prefill chunk 16384 rc=$? $(date -u +%T)" >> $W/summary.txt; save
serve /tmp/l8b $W/server_l8b_check.log
timeout 200 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_check.py --target=127.0.0.1:$PORT --model=/tmp/l8b --tokens=1024 > $W/check_l8b.log 2>&1
echo "check l8b rc=$? $(date -u +%T)" >> $W/summary.txt; save
kill -TERM $PID; wait $PID
