#!/usr/bin/env bash
# Service transfer overhead: how much of a client's end-to-end latency is spent moving bytes
# (gRPC, protobuf, copies) rather than computing. Starts anchorserve (CPU backend) on 127.0.0.1
# with a free port, sends a request with many bytes and almost no compute (anchor mode,
# theta=-inf, B=16, s=1: only the anchor region is computed) RUNS times unary and RUNS times
# streamed, prints per run the client latency, the server's total, the difference and the
# effective MB/s of the bytes moved, then the medians; stops the server.
#
# usage: bench/service_transfer.sh [BIN_DIR] [RUNS] [-- extra anchorctl flags]
#   BIN_DIR  directory holding anchorserve and anchorctl (default build-perf/bin)
#   RUNS     runs per mode (default 5)
#   env SEQ_LEN Q_HEADS KV_HEADS HEAD_DIM DTYPE override the shape (default 16384 32 8 128 bf16:
#   192 MiB sent, 128 MiB received); CPU_THREADS the server's compute threads (default 2).
# Loopback only; every step is bounded by a timeout.
set -euo pipefail

BIN_DIR=${1:-build-perf/bin}
RUNS=${2:-5}
shift $(($# > 2 ? 2 : $#))
[[ ${1:-} == "--" ]] && shift
EXTRA=("$@")
SEQ_LEN=${SEQ_LEN:-16384}
Q_HEADS=${Q_HEADS:-32}
KV_HEADS=${KV_HEADS:-8}
HEAD_DIM=${HEAD_DIM:-128}
DTYPE=${DTYPE:-bf16}
CPU_THREADS=${CPU_THREADS:-2}

for exe in anchorserve anchorctl; do
  [[ -x "$BIN_DIR/$exe" ]] || { echo "no $BIN_DIR/$exe (build first)" >&2; exit 2; }
done

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN_DIR/anchorserve" --backend=cpu --host=127.0.0.1 --grpc_port=0 --metrics_port=0 \
  --port_file="$WORK/ports" --cpu_threads="$CPU_THREADS" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 300); do [[ -s "$WORK/ports" ]] && break; sleep 0.1; done
[[ -s "$WORK/ports" ]] || { echo "server did not start:" >&2; cat "$WORK/server.log" >&2; exit 1; }
PORT=$(sed -n 's/^grpc_port=//p' "$WORK/ports")
TARGET=127.0.0.1:$PORT
for _ in $(seq 100); do
  timeout 10 "$BIN_DIR/anchorctl" --target="$TARGET" health >/dev/null 2>&1 && break
  sleep 0.2
done

echo "# service_transfer: $(date -u +%FT%TZ) host=$(hostname) nproc=$(nproc) load=[$(cut -d' ' -f1-3 /proc/loadavg)]"
echo "# bins=$BIN_DIR shape N=$SEQ_LEN Hq=$Q_HEADS Hkv=$KV_HEADS d=$HEAD_DIM $DTYPE runs=$RUNS"
printf '%-6s %4s %12s %12s %12s %10s\n' mode run client_ms server_ms outside_ms MB/s

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

for mode in unary stream; do
  flags=()
  [[ $mode == stream ]] && flags+=(--stream)
  : >"$WORK/$mode.tsv"
  for run in $(seq "$RUNS"); do
    if ! timeout 300 "$BIN_DIR/anchorctl" --target="$TARGET" attend --inputs=random \
      --seq_len="$SEQ_LEN" --q_heads="$Q_HEADS" --kv_heads="$KV_HEADS" --head_dim="$HEAD_DIM" \
      --dtype="$DTYPE" --mode=anchor --theta=-inf --block_size=16 --step=1 \
      ${flags[@]+"${flags[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} >"$WORK/out" 2>&1; then
      echo "anchorctl failed:" >&2; cat "$WORK/out" >&2; exit 1
    fi
    client_ms=$(sed -n 's/^end-to-end latency: \([0-9.]*\) ms.*/\1/p' "$WORK/out")
    server_ms=$(sed -n 's/^server times:.*total \([0-9.]*\) ms.*/\1/p' "$WORK/out")
    # Bytes moved: Q+K+V out, the output back (element size from the dtype).
    elem=2; [[ $DTYPE == fp32 ]] && elem=4
    bytes=$(( SEQ_LEN * (2 * Q_HEADS + 2 * KV_HEADS) * HEAD_DIM * elem ))
    read -r outside mbps < <(awk -v c="$client_ms" -v s="$server_ms" -v b="$bytes" \
      'BEGIN {printf "%.1f %.0f\n", c - s, b / 1e6 / (c / 1e3)}')
    printf '%-6s %4d %12.1f %12.1f %12.1f %10s\n' "$mode" "$run" "$client_ms" "$server_ms" \
      "$outside" "$mbps"
    printf '%s\t%s\t%s\t%s\n' "$client_ms" "$server_ms" "$outside" "$mbps" >>"$WORK/$mode.tsv"
  done
  printf '%-6s %4s %12s %12s %12s %10s\n' "$mode" med \
    "$(cut -f1 "$WORK/$mode.tsv" | median)" "$(cut -f2 "$WORK/$mode.tsv" | median)" \
    "$(cut -f3 "$WORK/$mode.tsv" | median)" "$(cut -f4 "$WORK/$mode.tsv" | median)"
done
echo "# load after: [$(cut -d' ' -f1-3 /proc/loadavg)]"
