#!/usr/bin/env bash
# Streamed tensor throughput of two builds, alternated on one machine: for each round and each
# build, a fresh CPU server and `anchorctl attend --stream` called REPEATS times with almost no
# compute (theta -inf, 16-row groups), so the call is the wire plus the server's copies.
#   bench/serving/stream_ab.sh BEFORE_BIN_DIR AFTER_BIN_DIR [ROUNDS] [REPEATS] [SEQ_LEN]
# BIN_DIRs hold anchorserve and anchorctl (e.g. build/bin of two checkouts). Prints anchorctl's
# "wire:" line of each call, labelled, then the median upload and download GB/s of each build.
set -euo pipefail
before=$1
after=$2
rounds=${3:-3}
repeats=${4:-3}
seq_len=${5:-16384}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run_build() {  # label bin_dir
  local label=$1 bin=$2
  "$bin/anchorserve" --backend=cpu --cpu_threads=1 --grpc_port=0 --metrics_port=-1 \
    --port_file="$work/port" >"$work/server.log" 2>&1 &
  local server=$!
  for _ in $(seq 100); do [ -s "$work/port" ] && break; sleep 0.1; done
  local port
  port=$(sed -n 's/^grpc_port=//p' "$work/port")
  for _ in $(seq "$repeats"); do
    "$bin/anchorctl" --target="127.0.0.1:$port" attend --stream --inputs=random \
      --seq_len="$seq_len" --q_heads=32 --kv_heads=8 --head_dim=128 --theta=-inf \
      --block_size=16 --step=1 | sed -n "s/^wire: */$label /p"
  done
  kill -TERM "$server"
  wait "$server" || true
  rm -f "$work/port"
}

for round in $(seq "$rounds"); do
  run_build before "$before" | tee -a "$work/all"
  run_build after "$after" | tee -a "$work/all"
done

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
for label in before after; do
  up=$(grep "^$label " "$work/all" | sed -n 's/.*upload .*(\([0-9.]*\) GB\/s), download.*/\1/p' | median)
  down=$(grep "^$label " "$work/all" | sed -n 's/.*download .*(\([0-9.]*\) GB\/s).*/\1/p' | median)
  echo "median $label: upload $up GB/s, download $down GB/s ($rounds rounds x $repeats calls)"
done
