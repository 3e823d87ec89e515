#!/bin/bash
# Session 9, third call: pinned vs pageable request buffers, alternating servers, streamed 32k and
# 128k Attend (Llama shape), 3 rounds x 3 calls each after one warm-up call.
set -u
O=${OUT:?}; cd "$(dirname "$0")/.."; R=$PWD/.gpu/bundle/run; W=$O/w; mkdir -p $W
{ nvidia-smi --query-gpu=name,driver_version --format=csv; echo "bundle $(cat .gpu/bundle/commit.txt)"; date -u;
  echo "thp: $(cat /sys/kernel/mm/transparent_hugepage/enabled)"; echo "memlock: $(ulimit -l)"; } > $W/machine.txt 2>&1
port=50161
for round in 1 2 3; do for pin in true false; do
  $R anchorserve --backend=cuda --host=127.0.0.1 --grpc_port=$port --metrics_port=-1 --pin_host_buffers=$pin >> $W/server.log 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do $R anchorctl --target=127.0.0.1:$port health > /dev/null 2>&1 && break; sleep 0.2; done
  for n in 32768 131072; do for call in 0 1 2 3; do
    echo "--- round=$round pin=$pin N=$n call=$call"
    $R anchorctl --target=127.0.0.1:$port attend --stream --seq_len=$n --q_heads=32 --kv_heads=8 --head_dim=128 \
      | grep -E "server times|end-to-end|wire"
  done; done
  kill -TERM $pid; wait $pid
done; done > $W/ab.txt 2>&1
tar czf $O/out.tgz -C $W . && rm -rf $W
