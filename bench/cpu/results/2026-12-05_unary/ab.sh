#!/usr/bin/env bash
# Alternates two builds (server and client of one build each) on unary Attend calls over loopback
# and prints end to end and the server's total per call (RESULTS sections 6 and 7).
#   usage: BASE=B NEW=B [BACKEND=cpu|cuda] [N=16384] [ATTEND_FLAGS=...] ab.sh ROUNDS CALLS
# where B is a directory holding anchorserve and anchorctl, or a GPU bundle's `run` script.
# ATTEND_FLAGS default to almost no compute on the CPU backend: anchor mode, theta = -inf, B 16, s 1.
set -u
launch() {  # launch BUILD EXE ARGS...
  local build=$1 exe=$2
  shift 2
  if [ -d "$build" ]; then "$build/$exe" "$@"; else "$build" "$exe" "$@"; fi
}
backend=${BACKEND:-cpu}
threads=()
[ "$backend" = cpu ] && threads=(--cpu_threads=2)
for r in $(seq "${1:-3}"); do for c in BASE NEW; do
  build=${!c}; ports=$(mktemp)
  launch "$build" anchorserve --backend="$backend" --host=127.0.0.1 --grpc_port=0 \
    --metrics_port=0 --port_file="$ports" "${threads[@]}" > /dev/null 2>&1 &
  server=$!
  for _ in $(seq 300); do [ -s "$ports" ] && break; sleep 0.1; done
  port=$(sed -n 's/^grpc_port=//p' "$ports")
  for i in $(seq "${2:-3}"); do
    launch "$build" anchorctl --target=127.0.0.1:$port attend --inputs=random \
      --seq_len="${N:-16384}" --q_heads=32 --kv_heads=8 --head_dim=128 --dtype=bf16 \
      ${ATTEND_FLAGS:---mode=anchor --theta=-inf --block_size=16 --step=1} 2>&1 |
      awk -v c=$c -v r=$r -v i=$i '/server times/{t=$(NF-1)} /end-to-end/{e=$3}
        END{printf "%s round %s call %s e2e %s server_total %s wire %.1f\n", c, r, i, e, t, e-t}'
  done
  kill -TERM $server; wait $server 2>/dev/null; rm -f "$ports"
done; done
