#!/usr/bin/python3
"""KV download rate of the Python client's prefill() against a server that streams a synthetic
cache as fast as it can (anchor_prefill_wire_bench --serve_seconds=S) or a real anchorserve.

Prints, per call, the seconds from the call to the returned result and the KV bytes per second,
with bf16 widened to float32 (the client's default) and kept raw (raw_bf16=True). Needs the
anchorserve_client package on PYTHONPATH (client/python) and its generated modules
(ANCHORSERVE_CLIENT_GEN_DIR), numpy and grpcio.

  prefill_wire_python.py --target=127.0.0.1:PORT --tokens=16384 [--reps=3]
"""

import argparse
import statistics
import time

import anchorserve_client


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--target', required=True)
    parser.add_argument('--tokens', type=int, default=16384)
    parser.add_argument('--reps', type=int, default=3)
    args = parser.parse_args()
    ids = list(range(args.tokens))
    print('| client | calls | GB/s median | GB/s min-max | s median |')
    print('|---|---|---|---|---|')
    for raw in (False, True):
        seconds, kv_bytes = [], 0
        for _ in range(args.reps):
            start = time.perf_counter()
            result = anchorserve_client.prefill(args.target, ids, logits='none', raw_bf16=raw)
            seconds.append(time.perf_counter() - start)
            kv_bytes = result.kv_bytes
            del result
        rates = [kv_bytes / s / 1e9 for s in seconds]
        print(f'| python prefill(raw_bf16={raw}) | {args.reps} | '
              f'{kv_bytes / statistics.median(seconds) / 1e9:.2f} | '
              f'{min(rates):.2f}-{max(rates):.2f} | {statistics.median(seconds):.3f} |')


if __name__ == '__main__':
    main()
