"""Checks anchorserve_client against a running server: the same prompt as a KV file that anchorctl
wrote (safetensors, fp32, head-major) must come back with the same K/V and the same argmax.

  real_server_check.py --target=HOST:PORT --ids=1,2,3 --compare_to=kv.safetensors --argmax=N

Run by the end-to-end tests (tests/e2e/prefill_test.cc); exits non-zero with a message on a
mismatch.
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import anchorserve_client  # noqa: E402


def read_safetensors(path):
    with open(path, 'rb') as f:
        data = f.read()
    (header_len,) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == '__metadata__':
            continue
        if entry['dtype'] != 'F32':
            raise SystemExit(f'{path}: {name} is {entry["dtype"]}, expected F32')
        begin, end = entry['data_offsets']
        tensors[name] = np.frombuffer(data[base + begin:base + end],
                                      dtype='<f4').reshape(entry['shape'])
    return tensors


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--target', required=True)
    parser.add_argument('--ids', required=True)
    parser.add_argument('--compare_to', required=True)
    parser.add_argument('--argmax', type=int, required=True)
    args = parser.parse_args()
    ids = [int(x) for x in args.ids.split(',')]
    info = anchorserve_client.model_info(args.target)
    result = anchorserve_client.prefill(args.target, ids, kv_dtype='fp32', dense=True,
                                        timeout=120)
    expected = read_safetensors(args.compare_to)
    if len(result.layers) != info.num_layers:
        raise SystemExit(f'{len(result.layers)} layers returned, the model has {info.num_layers}')
    for kv in result.layers:
        for name, got in (('k', kv.k), ('v', kv.v)):
            want = expected[f'layers.{kv.layer}.{name}']
            if got.shape != want.shape:
                raise SystemExit(f'layers.{kv.layer}.{name}: shape {got.shape}, want {want.shape}')
            # Two runs of the same server code: equal up to a few fp32 ulps.
            bad = ~(np.abs(got - want) <= 1e-5 * (1 + np.abs(want)))
            if bad.any():
                raise SystemExit(f'layers.{kv.layer}.{name}: {int(bad.sum())} elements differ')
    if result.argmax_token_id != args.argmax:
        raise SystemExit(f'argmax {result.argmax_token_id}, anchorctl saw {args.argmax}')
    if result.logits is None or result.logits.shape != (info.vocab_size,):
        raise SystemExit('full logits missing')
    print(f'OK: {len(result.layers)} layers of {result.num_tokens} tokens match')


if __name__ == '__main__':
    main()
