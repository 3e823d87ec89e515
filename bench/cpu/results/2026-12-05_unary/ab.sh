#!/usr/bin/env bash
# Alternates two builds (server and client of one build each) on unary Attend calls over loopback
# and prints end to end and the server's total per call (RESULTS section 7).
#   usage: BASE=dir/with/anchorserve+anchorctl NEW=dir N=16384 ab.sh ROUNDS CALLS
set -u
for r in $(seq "${1:-3}"); do for c in BASE NEW; do
  dir=${!c}; pkill -x anchorserve; sleep 0.5; ports=$(mktemp)
  "$dir/anchorserve" --backend=cpu --host=127.0.0.1 --grpc_port=0 --metrics_port=0 \
    --port_file="$ports" --cpu_threads=2 > /dev/null 2>&1 &
  for _ in $(seq 50); do [ -s "$ports" ] && break; sleep 0.1; done
  port=$(sed -n 's/^grpc_port=//p' "$ports")
  for i in $(seq "${2:-3}"); do
    "$dir/anchorctl" --target=127.0.0.1:$port attend --inputs=random --seq_len="${N:-16384}" \
      --q_heads=32 --kv_heads=8 --head_dim=128 --dtype=bf16 --mode=anchor --theta=-inf \
      --block_size=16 --step=1 2>&1 |
      awk -v c=$c -v r=$r -v i=$i '/server times/{t=$(NF-1)} /end-to-end/{e=$3}
        END{printf "%s round %s call %s e2e %s server_total %s wire %.1f\n", c, r, i, e, t, e-t}'
  done
  pkill -x anchorserve; rm -f "$ports"
done; done
