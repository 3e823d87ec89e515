#!/usr/bin/python3
"""KV download rate of the Python client's prefill() against a server that streams a synthetic
cache as fast as it can (anchor_prefill_wire_bench --serve_seconds=S) or a real anchorserve.

Prints the KV bytes per second of the process's first call (which maps the memory the results
take) and the median of the later calls, with bf16 widened to float32 (the client's default) or
kept raw (--raw_bf16). Run each mode in a fresh process. Needs the
anchorserve_client package on PYTHONPATH (client/python) and its generated modules
(ANCHORSERVE_CLIENT_GEN_DIR), numpy and grpcio.

  prefill_wire_python.py --target=127.0.0.1:PORT --tokens=16384 [--reps=4] [--raw_bf16]
"""

import argparse
import statistics
import time

import anchorserve_client


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--target', required=True)
    parser.add_argument('--tokens', type=int, default=16384)
    parser.add_argument('--reps', type=int, default=4)
    parser.add_argument('--raw_bf16', action='store_true')
    args = parser.parse_args()
    ids = list(range(args.tokens))
    seconds, kv_bytes = [], 0
    for _ in range(args.reps):
        start = time.perf_counter()
        result = anchorserve_client.prefill(args.target, ids, logits='none',
                                            raw_bf16=args.raw_bf16)
        seconds.append(time.perf_counter() - start)
        kv_bytes = result.kv_bytes
        del result
    later = seconds[1:] or seconds
    print(f'| python prefill(raw_bf16={args.raw_bf16}) | {args.reps} | '
          f'{kv_bytes / seconds[0] / 1e9:.2f} | '
          f'{kv_bytes / statistics.median(later) / 1e9:.2f} | '
          f'{kv_bytes / max(later) / 1e9:.2f}-{kv_bytes / min(later) / 1e9:.2f} |')


if __name__ == '__main__':
    main()
