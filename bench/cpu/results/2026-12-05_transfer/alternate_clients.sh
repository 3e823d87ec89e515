#!/usr/bin/env bash
# Alternates two anchorctl builds against one CPU-backend server on loopback and prints, per call,
# end to end, upload and download milliseconds as anchorctl reports them (RESULTS section 7).
#   usage: BASE=path/to/old/anchorctl NEW=path/to/new/anchorctl SERVER=path/to/anchorserve \
#          N=16384 alternate_clients.sh PAIRS
set -u
pkill -x anchorserve; sleep 0.5; ports=$(mktemp)
"$SERVER" --backend=cpu --host=127.0.0.1 --grpc_port=0 --metrics_port=0 --port_file="$ports" \
  --cpu_threads=2 > /dev/null 2>&1 &
for _ in $(seq 50); do [ -s "$ports" ] && break; sleep 0.1; done
PORT=$(sed -n 's/^grpc_port=//p' "$ports")
for i in $(seq "${1:-5}"); do for c in BASE NEW; do
  "${!c}" --target=127.0.0.1:$PORT attend --inputs=random --seq_len="${N:-16384}" --q_heads=32 \
    --kv_heads=8 --head_dim=128 --dtype=bf16 --mode=anchor --theta=-inf --block_size=16 \
    --step=1 --stream 2>&1 |
    awk -v c=$c '/end-to-end/{e=$3} /wire:/{u=$6; d=$14} END{printf "%s e2e %s upload %s download %s\n", c, e, u, d}'
done; done
pkill -x anchorserve; rm -f "$ports"
