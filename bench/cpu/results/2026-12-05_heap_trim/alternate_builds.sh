#!/usr/bin/env bash
# Alternates two builds, server and anchorctl together, on loopback (CPU backend) and prints, per
# call, end to end, upload and download milliseconds as anchorctl reports them.
#   usage: BASE=old/build/bin NEW=new/build/bin N=16384 CALLS=3 alternate_builds.sh ROUNDS
set -u
for round in $(seq "${1:-3}"); do for side in BASE NEW; do
  bin=${!side}; ports=$(mktemp)
  "$bin/anchorserve" --backend=cpu --host=127.0.0.1 --grpc_port=0 --metrics_port=0 \
    --port_file="$ports" --cpu_threads=2 > /dev/null 2>&1 &
  server=$!
  for _ in $(seq 100); do [ -s "$ports" ] && break; sleep 0.1; done
  port=$(sed -n 's/^grpc_port=//p' "$ports")
  for call in $(seq "${CALLS:-3}"); do
    "$bin/anchorctl" --target=127.0.0.1:$port attend --inputs=random --seq_len="${N:-16384}" \
      --q_heads=32 --kv_heads=8 --head_dim=128 --dtype=bf16 --mode=anchor --theta=-inf \
      --block_size=16 --step=1 --stream 2>&1 |
      awk -v s=$side -v r=$round -v c=$call '/end-to-end/{e=$3} /wire:/{u=$6; d=$14}
        END{printf "round %s %s call %s: e2e %s upload %s download %s\n", r, s, c, e, u, d}'
  done
  kill $server; wait $server 2>/dev/null; rm -f "$ports"
done; done
