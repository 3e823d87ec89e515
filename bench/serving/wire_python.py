#!/usr/bin/env python3
"""Tensor throughput of Python grpcio against a running anchorserve, each way.

Sends one bf16 Llama-shaped request (N tokens, 32 query heads, 8 KV heads, d 128) over
AttendStream in chunks and, when it fits a message, over unary Attend; prints client-measured
upload time (call start to the last chunk handed to grpcio), download time (output_spec to the
last output chunk) and end-to-end time. Needs the generated anchorserve.v1 modules
(ANCHORSERVE_CLIENT_GEN_DIR) and numpy.

  wire_python.py --target=127.0.0.1:50051 --seq_len=16384 [--chunk_mib=4] [--reps=3]
"""

import argparse
import os
import sys
import time

import grpc
import numpy as np

sys.path.insert(0, os.environ.get('ANCHORSERVE_CLIENT_GEN_DIR', ''))
from anchorserve.v1 import anchorserve_pb2 as pb  # noqa: E402
from anchorserve.v1 import anchorserve_pb2_grpc as pb_grpc  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
MAX_MESSAGE = 2**31 - 1


def spec(n, heads):
    return pb.TensorSpec(dtype=pb.DATA_TYPE_BF16, shape=[n, heads, HEAD_DIM],
                         layout=pb.TENSOR_LAYOUT_TOKEN_MAJOR)


def config():
    # Cheap attention (anchor region only) so that the time is the bytes'.
    return pb.AnchorConfig(theta=float('-inf'), block_size=16, step=1)


def streamed(stub, n, tensors, chunk):
    marks = {}

    def requests():
        marks['start'] = time.perf_counter()
        yield pb.AttendStreamRequest(header=pb.StreamHeader(
            q=spec(n, Q_HEADS), k=spec(n, KV_HEADS), v=spec(n, KV_HEADS), config=config()))
        for name, data in tensors:
            view = memoryview(data)
            for offset in range(0, len(view), chunk):
                yield pb.AttendStreamRequest(chunk=pb.TensorChunk(
                    tensor=name, offset=offset, data=bytes(view[offset:offset + chunk])))
        marks['uploaded'] = time.perf_counter()

    received = 0
    for response in stub.AttendStream(requests()):
        kind = response.WhichOneof('kind')
        if kind == 'output_spec':
            marks['first'] = time.perf_counter()
        elif kind == 'chunk':
            received += len(response.chunk.data)
            marks['last'] = time.perf_counter()
    end = time.perf_counter()
    return (marks['uploaded'] - marks['start'], marks['last'] - marks['first'],
            end - marks['start'], received)


def unary(stub, n, tensors):
    q, k, v = (pb.Tensor(dtype=pb.DATA_TYPE_BF16, shape=[n, h, HEAD_DIM],
                         layout=pb.TENSOR_LAYOUT_TOKEN_MAJOR, data=data)
               for (_, data), h in zip(tensors, (Q_HEADS, KV_HEADS, KV_HEADS)))
    start = time.perf_counter()
    response = stub.Attend(pb.AttendRequest(q=q, k=k, v=v, config=config()))
    return time.perf_counter() - start, len(response.output.data)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--target', default='127.0.0.1:50051')
    parser.add_argument('--seq_len', type=int, default=16384)
    parser.add_argument('--chunk_mib', type=float, default=4)
    parser.add_argument('--reps', type=int, default=3)
    args = parser.parse_args()
    n = args.seq_len
    rng = np.random.default_rng(1)
    tensors = [(pb.TENSOR_NAME_Q, rng.integers(0, 2**16, n * Q_HEADS * HEAD_DIM,
                                               dtype=np.uint16).tobytes()),
               (pb.TENSOR_NAME_K, rng.integers(0, 2**16, n * KV_HEADS * HEAD_DIM,
                                               dtype=np.uint16).tobytes()),
               (pb.TENSOR_NAME_V, rng.integers(0, 2**16, n * KV_HEADS * HEAD_DIM,
                                               dtype=np.uint16).tobytes())]
    # Real data would be finite bf16; the server rejects nothing here, so keep values finite:
    # clear each element's exponent top bit.
    tensors = [(name, (np.frombuffer(data, dtype=np.uint16) & 0xBFFF).tobytes())
               for name, data in tensors]
    sent = sum(len(d) for _, d in tensors)
    options = [('grpc.max_send_message_length', MAX_MESSAGE),
               ('grpc.max_receive_message_length', MAX_MESSAGE)]
    with grpc.insecure_channel(args.target, options=options) as channel:
        stub = pb_grpc.AttentionServiceStub(channel)
        chunk = int(args.chunk_mib * 2**20)
        for rep in range(args.reps):
            up, down, total, received = streamed(stub, n, tensors, chunk)
            print(f'python stream N={n} rep={rep}: upload {sent / 2**20:.0f} MiB {up * 1e3:.1f} ms '
                  f'({sent / up / 1e9:.2f} GB/s), download {received / 2**20:.0f} MiB '
                  f'{down * 1e3:.1f} ms ({received / down / 1e9:.2f} GB/s), total '
                  f'{total * 1e3:.1f} ms')
        if sent * 1.8 < 2**31:
            for rep in range(args.reps):
                total, received = unary(stub, n, tensors)
                print(f'python unary N={n} rep={rep}: {sent / 2**20:.0f} MiB up + '
                      f'{received / 2**20:.0f} MiB down in {total * 1e3:.1f} ms '
                      f'({(sent + received) / total / 1e9:.2f} GB/s both ways)')


if __name__ == '__main__':
    main()
