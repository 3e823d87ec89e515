#!/bin/bash
# Session 9, second call: GPU tests of the merged head (tensor-core mass histogram + pinned host
# buffers), bare loopback bytes, then the serving bench three ways: pinned (default), not pinned,
# pinned with --max_queue_delay_ms=0. Everything is tarred at the end.
set -u
O=${OUT:?}; cd "$(dirname "$0")/.."; R=$PWD/.gpu/bundle/run; W=$O/w; mkdir -p $W
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; echo "bundle $(cat .gpu/bundle/commit.txt 2>/dev/null)"; date -u; } > $W/machine.txt 2>&1
t0=$(date +%s); s() { echo "$1 rc=$2 at $(( $(date +%s) - t0 )) s" >> $W/summary.txt; }
python3 bench/serving/loopback_bytes.py --reps=5 > $W/loopback.txt 2>&1; s loopback $?
python3 bench/serving/loopback_bytes.py --up_mib=6 --down_mib=4 --reps=5 >> $W/loopback.txt 2>&1
sb() { # name, python?, server flags...
  local name=$1 py=$2; shift 2
  local gen=; [ $py = 1 ] && gen=$PWD/.gpu/pygen
  ANCHOR_RUN=$R LENGTHS="${LENGTHS-8192 16384 131072}" LOAD_SHAPES="2048:8:2 2048:32:8 8192:32:8" \
    CONCURRENCY="1 8 32" LOAD_REQUESTS_PER_CALLER=4 LOAD_REQUESTS_MIN=32 \
    ANCHORSERVE_CLIENT_GEN_DIR=$gen timeout 150 bench/serving/serving_bench.sh $W/$name "$@" > $W/$name.log 2>&1
  s $name $?
}
sb pinned 1
sb unpinned 0 --pin_host_buffers=false
OUT=$W/tests timeout 180 scripts/gpu.sh run tests > $W/tests.log 2>&1; s tests $?
sb pinned_delay0 0 --max_queue_delay_ms=0
LENGTHS= LOAD_FLAGS=--stream sb pinned_stream_load 0
tar czf $O/out.tgz -C $W . && rm -rf $W
