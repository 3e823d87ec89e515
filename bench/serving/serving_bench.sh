#!/usr/bin/env bash
# Serving-path benchmark: anchorserve and its clients on one machine's loopback.
#   1. single Llama-shape bf16 requests (32 query heads, 8 KV heads, d 128), streamed and unary:
#      server stage times, client-measured upload/download rates, end to end
#   2. Python grpcio throughput (bench/serving/wire_python.py)
#   3. small requests under load, batching on (server defaults) and off (--max_batch_requests=1);
#      bench/serving/load_table.py turns load.txt into a markdown table
# Usage: serving_bench.sh OUT_DIR [server flags...]
# Environment: ANCHOR_RUN (prefix that runs a binary, e.g. ".gpu/bundle/run"; default: build/bin
# directly), BACKEND (cuda|cpu, default cuda), LENGTHS (single-request lengths, default
# "8192 16384 32768 131072"; empty: none), LOAD_SHAPES ("N:Hq:Hkv ..."), CONCURRENCY ("1 8 32 64"),
# LOAD_REQUESTS_PER_CALLER and LOAD_REQUESTS_MIN (requests of a load run: max(MIN, c * PER_CALLER),
# default 8 and 64), LOAD_REPEATS (runs of each load row, default 1: rows vary between runs),
# LOAD_FLAGS (more anchorctl load flags, e.g. --stream; default: unary),
# ANCHORSERVE_CLIENT_GEN_DIR (the generated Python modules, for step 2), PYTHON (default python3).
set -u
out=${1:?usage: serving_bench.sh OUT_DIR [server flags...]}
shift
mkdir -p "$out"
root=$(cd "$(dirname "$0")/../.." && pwd)
run() {
  if [ -n "${ANCHOR_RUN:-}" ]; then "$ANCHOR_RUN" "$@"; else "$root/build/bin/$1" "${@:2}"; fi
}
backend=${BACKEND:-cuda}
port=${PORT:-50151}
target=127.0.0.1:$port
server_pid=
start_server() {
  stop_server
  run anchorserve --backend="$backend" --host=127.0.0.1 --grpc_port="$port" --metrics_port=-1 \
    "$@" >>"$out/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 300); do
    run anchorctl --target="$target" health >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server did not start; see $out/server.log" >&2
  return 1
}
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
    server_pid=
  fi
}
trap stop_server EXIT
shape=(--q_heads=32 --kv_heads=8 --head_dim=128)

start_server "$@" || exit 1
for n in ${LENGTHS-8192 16384 32768 131072}; do
  for mode in stream unary; do
    # A unary Attend must fit one message (--max_message_bytes, 256 MiB by default).
    if [ $mode = unary ] && [ "$n" -gt 16384 ]; then continue; fi
    for rep in 1 2 3; do
      echo "--- single N=$n $mode rep=$rep"
      stream_flag=()
      if [ $mode = stream ]; then stream_flag=(--stream); fi
      run anchorctl --target="$target" attend "${stream_flag[@]}" \
        --seq_len="$n" "${shape[@]}" | grep -E "server times|end-to-end|wire"
    done
  done
done >"$out/single.txt" 2>&1
if [ -n "${ANCHORSERVE_CLIENT_GEN_DIR:-}" ]; then
  "${PYTHON:-python3}" "$root/bench/serving/wire_python.py" --target="$target" --seq_len=16384 --reps=3 \
    >"$out/python.txt" 2>&1
fi
for batching in on off; do
  if [ $batching = on ]; then start_server "$@"; else start_server "$@" --max_batch_requests=1; fi
  for load_shape in ${LOAD_SHAPES:-2048:8:2 2048:32:8 8192:32:8}; do
    IFS=: read -r n hq hkv <<<"$load_shape"
    for c in ${CONCURRENCY:-1 8 32 64}; do
      per_caller=${LOAD_REQUESTS_PER_CALLER:-8}
      at_least=${LOAD_REQUESTS_MIN:-64}
      requests=$((c * per_caller > at_least ? c * per_caller : at_least))
      for rep in $(seq 1 "${LOAD_REPEATS:-1}"); do
        echo "--- load batching=$batching N=$n Hq=$hq Hkv=$hkv c=$c requests=$requests rep=$rep"
        run anchorctl --target="$target" load --requests=$requests --concurrency="$c" \
          --seq_len="$n" --q_heads="$hq" --kv_heads="$hkv" --head_dim=128 ${LOAD_FLAGS:-} |
          grep -E "throughput|latency|errors"
      done
    done
  done
done >"$out/load.txt" 2>&1
stop_server
