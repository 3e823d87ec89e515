# Helpers for a device-call script (sourced; run from the repository root on the GPU host with OUT
# set): logs go to $W = $OUT/w and are packed into $OUT/out.tgz after every step, so a call cut
# short still returns what it finished.
#
#   step NAME RC         appends "NAME rc=RC HH:MM:SS" to summary.txt and packs the logs
#   sample FILE          samples SM clock, power, temperature and throttle reasons every 100 ms
#                        into $W/FILE until `kill $SAMPLER`
#   serve MODEL LOG      starts anchorserve --backend=cuda --model=MODEL (log in $W/LOG) and waits
#                        until it answers; sets PORT (gRPC), MPORT (metrics) and PID
#   scrape FILE          appends anchorserve_pinned_host_bytes from /metrics to $W/FILE
# shellcheck disable=SC2034  # B, SAMPLER, PID, PORT and MPORT are for the sourcing script
B=$PWD/.gpu/bundle
W=$OUT/w
mkdir -p "$W"
export ANCHORSERVE_CLIENT_GEN_DIR=$PWD/client/python/anchorserve_client/_gen
ANCHOR_PYTHON=$(command -v python3)
export ANCHOR_PYTHON
{ nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv; date -u; } > "$W/machine.txt" 2>&1

save() { tar czf "$OUT/out.tgz" -C "$W" . ; }
step() { echo "$1 rc=$2 $(date -u +%T)" >> "$W/summary.txt"; save; }
sample() {
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv,noheader -lms 100 > "$W/$1" 2>&1 &
  SAMPLER=$!
}
serve() {
  rm -f /tmp/port
  "$B/run" anchorserve --backend=cuda --model="$1" --grpc_port=0 --metrics_port=0 --port_file=/tmp/port \
    --prefill_memory_bytes=34359738368 > "$W/$2" 2>&1 &
  PID=$!
  for _ in $(seq 1 120); do
    if [ -s /tmp/port ] && "$B/run" anchorctl health --target=127.0.0.1:"$(head -1 /tmp/port | tr -dc 0-9)" >/dev/null 2>&1; then break; fi
    sleep 0.5
  done
  PORT=$(head -1 /tmp/port | tr -dc 0-9)
  MPORT=$(sed -n 2p /tmp/port | tr -dc 0-9)
}
scrape() {
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$MPORT/metrics').read().decode())" \
    | grep -E '^anchorserve_pinned_host_bytes' >> "$W/$1"
}
