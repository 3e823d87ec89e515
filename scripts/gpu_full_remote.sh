#!/usr/bin/env bash
# Runs on the GPU machine (bundle from scripts/gpu_full_check.sh): attention kernel tests, CUDA
# backend tests, then the service end to end on the CUDA backend (anchorserve + anchorctl
# info / attend --verify / a 16k-token request), then the kernel benchmark against cuDNN.
# Logs under $OUT.
set -uo pipefail
bundle=${1:?usage: gpu_full_remote.sh BUNDLE_DIR [anchor_kernel_bench args...]}
shift
out=${OUT:-./gpu_out}
mkdir -p "$out"
root=$(cd "$(dirname "$0")/.." && pwd)

timeout 200 "$bundle/run" anchor_attention_kernel_test --gtest_color=no > "$out/kernel_tests.log" 2>&1
echo "attention kernel tests exit: $?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED" "$out/kernel_tests.log"

# Service on the CUDA backend, driven by anchorctl over loopback.
port_file=$(mktemp)
"$bundle/run" anchorserve --backend=cuda --host=127.0.0.1 --grpc_port=0 --metrics_port=0 \
  --port_file="$port_file" > "$out/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do [ -s "$port_file" ] && break; sleep 0.1; done
grpc_port=$(sed -n 's/^grpc_port=//p' "$port_file")
target=127.0.0.1:$grpc_port
{
  "$bundle/run" anchorctl --target="$target" info
  echo "info exit: $?"
  "$bundle/run" anchorctl --target="$target" attend --seq_len=16384 --q_heads=32 --kv_heads=8 \
    --head_dim=128 --dtype=bf16 --verify --recall
  echo "attend 16k verify exit: $?"
  "$bundle/run" anchorctl --target="$target" attend --seq_len=5000 --q_heads=8 --kv_heads=2 \
    --head_dim=64 --dtype=fp16 --layout=head --verify
  echo "attend 5000 fp16 d64 head-major verify exit: $?"
  for i in 1 2 3; do
    "$bundle/run" anchorctl --target="$target" attend --seq_len=16384 --q_heads=32 --kv_heads=8 \
      --head_dim=128 --dtype=bf16 --seed=$i
  done
  echo "16k latency runs exit: $?"
  "$bundle/run" anchorctl --target="$target" load --requests=32 --concurrency=4 --seq_len=8192 \
    --q_heads=32 --kv_heads=8 --head_dim=128 --dtype=bf16
  echo "load exit: $?"
} > "$out/service.log" 2>&1
cat "$out/service.log" | cut -c1-200 | head -150
kill -TERM "$server_pid"; wait "$server_pid"; echo "server exit after SIGTERM: $?"

timeout 200 "$bundle/run" anchor_gpu_tests --gtest_color=no > "$out/backend_tests.log" 2>&1
echo "backend tests exit: $?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED" "$out/backend_tests.log"
"$bundle/run" anchor_cuda_plan_tests --gtest_brief=1 > "$out/plan_tests.log" 2>&1
echo "plan tests exit: $?"

PYTHONUNBUFFERED=1 timeout 150 python3 "$root/bench/gpu/sdpa_baseline.py" 4096 8192 16384 32768 65536 131072 \
  > "$out/sdpa.log" 2>&1
echo "sdpa exit: $?"
timeout 240 "$bundle/run" anchor_kernel_bench --out="$out" --sdpa_log="$out/sdpa.log" "$@" \
  > "$out/bench.log" 2>&1
echo "bench exit: $?"
sed -n '/== summary ==/,$p' "$out/bench.log"
