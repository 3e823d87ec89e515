#!/bin/bash
# Alternates two checkouts' Prefill clients over loopback against the synthetic KV server of
# anchor_prefill_wire_bench (RESULTS section 7):
#   - the C++ client: each build's own bench binary (server and client in one process), and the
#     NEW one again with glibc's trim threshold at anchorserve's and anchorctl's 64 MiB;
#   - the Python client: each checkout's client/python against the NEW build's server serving
#     with that threshold, as anchorserve does; each mode in a fresh process (columns: calls,
#     GB/s of the first call, median and range of the later calls).
#   BASE=/path/to/old/checkout NEW=/path/to/new/checkout ab.sh ROUNDS [bench flags...]
# Each checkout has its build in build/ (anchor_prefill_wire_bench, client/python/gen).
set -euo pipefail
rounds=${1:-2}
shift || true
flags=("$@")
tokens=16384
for f in "${flags[@]}"; do case "$f" in --tokens=*) tokens=${f#--tokens=} ;; esac; done
trim=glibc.malloc.trim_threshold=67108864
serve_log=$(mktemp)
GLIBC_TUNABLES=$trim "$NEW/build/bin/anchor_prefill_wire_bench" "${flags[@]}" \
  --serve_seconds=3600 >"$serve_log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$serve_log"' EXIT
for _ in $(seq 50); do grep -q listening "$serve_log" && break; sleep 0.1; done
port=$(sed -n 's/listening on 127.0.0.1://p' "$serve_log")
for round in $(seq "$rounds"); do
  for side in BASE NEW NEW+trim; do
    dir=${BASE}
    tunables=
    case $side in NEW) dir=$NEW ;; NEW+trim) dir=$NEW tunables=$trim ;; esac
    echo "## round $round, $side ($(git -C "$dir" rev-parse --short HEAD))"
    GLIBC_TUNABLES=$tunables "$dir/build/bin/anchor_prefill_wire_bench" "${flags[@]}" \
      --repeats=3 | tail -n +4
    [ "$side" = NEW+trim ] && continue
    for raw in "" --raw_bf16; do  # a fresh process per mode: its first call maps the memory
      PYTHONPATH="$dir/client/python" ANCHORSERVE_CLIENT_GEN_DIR="$NEW/build/client/python/gen" \
        /usr/bin/python3 "$NEW/bench/serving/prefill_wire_python.py" --target="127.0.0.1:$port" \
        --tokens="$tokens" --reps=4 $raw
    done
  done
done
