#!/usr/bin/env bash
# Prepared in session 12, not run (no device time left): the continuation checks with the
# teacher-forced criterion (8B shape, tiny models), the Qwen2.5-7B-shape prefill against
# transformers, and the GPU suites when the card is an H200. Expects a bundle in .gpu/bundle (with
# anchorserve, anchorctl, anchor_prefill_bench and the GPU tests) and the Python stubs from
# client/python/generate_stubs.sh; run from the repository root on the GPU host with OUT set.
set -uo pipefail
B=$PWD/.gpu/bundle
W=$OUT/w; mkdir -p $W
save() { tar czf $OUT/out.tgz -C $W . ; }
export ANCHORSERVE_CLIENT_GEN_DIR=$PWD/client/python/anchorserve_client/_gen
nvidia-smi --query-gpu=name,clocks.max.sm,driver_version --format=csv > $W/machine.txt 2>&1; date -u >> $W/machine.txt
python3 scripts/make_tiny_model.py --preset=llama3-gpu-tiny --out=/tmp/llama3-gpu-tiny > /dev/null
python3 scripts/make_tiny_model.py --preset=qwen2-gpu-tiny --out=/tmp/qwen2-gpu-tiny > /dev/null
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
if [ ! -f /tmp/l8b/config.json ]; then
  timeout 60 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_baseline.py --shape=llama-3.1-8b --out=/tmp/l8b --tokens=1024 > $W/l8b_build.log 2>&1
fi
serve /tmp/l8b $W/server_l8b_check.log
timeout 150 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_check.py --target=127.0.0.1:$PORT --model=/tmp/l8b --tokens=1024 > $W/check_l8b.log 2>&1
echo "check l8b rc=$? $(date -u +%T)" >> $W/summary.txt; save
kill -TERM $PID; wait $PID
for m in llama3-gpu-tiny qwen2-gpu-tiny; do
  serve /tmp/$m $W/server_$m.log
  timeout 60 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_check.py --target=127.0.0.1:$PORT --model=/tmp/$m --tokens=512 > $W/check_$m.log 2>&1
  echo "check $m rc=$? $(date -u +%T)" >> $W/summary.txt
  kill -TERM $PID; wait $PID
done
save
rm -rf /tmp/l8b
timeout 120 env PYTHONUNBUFFERED=1 python3 bench/gpu/prefill_baseline.py --shape=qwen2.5-7b --out=/tmp/q7b --tokens=32768,131072 > $W/qwen_baseline.log 2>&1
echo "qwen baseline rc=$? $(date -u +%T)" >> $W/summary.txt; save
timeout 90 $B/run anchor_prefill_bench --engine=cuda --model=/tmp/q7b --tokens=32768,131072 --dense --repeats=2 > $W/qwen_dense.log 2>&1
echo "qwen dense rc=$? $(date -u +%T)" >> $W/summary.txt; save
if grep -q H200 $W/machine.txt; then
  OUT=$W/suites timeout 130 scripts/gpu.sh run tests > $W/tests.log 2>&1
  echo "tests rc=$? $(date -u +%T)" >> $W/summary.txt; save
fi
