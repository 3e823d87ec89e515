#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/ (checked in; re-run
after a message or format change). Valid inputs plus a few near-misses, encoded by hand so that
no generated code is needed: each seed is small, libFuzzer mutates from there."""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def varint(value):
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_varint(number, value):
    return varint(number << 3) + varint(value)


def field_bytes(number, payload):
    return varint((number << 3) | 2) + varint(len(payload)) + payload


def tensor(dtype, shape, layout, data=None):
    out = field_varint(1, dtype) + field_bytes(2, b"".join(varint(d) for d in shape))
    out += field_varint(3, layout)
    if data is not None:
        out += field_bytes(4, data)
    return out


def write(target, name, payload):
    directory = os.path.join(ROOT, target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(payload)


def attend_request(seq, hq, hkv, d, dtype=1, data=True, request_id=b"seed"):
    size = 4 if dtype == 3 else 2
    q_bytes = seq * hq * d * size
    kv_bytes = seq * hkv * d * size
    out = field_bytes(1, request_id)
    out += field_bytes(2, tensor(dtype, [seq, hq, d], 1, b"\x01" * q_bytes if data else None))
    out += field_bytes(3, tensor(dtype, [seq, hkv, d], 1, b"\x02" * kv_bytes if data else None))
    out += field_bytes(4, tensor(dtype, [seq, hkv, d], 1, b"\x03" * kv_bytes if data else None))
    config = field_varint(1, 1) + varint((3 << 3) | 0) + varint(16)
    out += field_bytes(5, config)
    return out


def main():
    # Unary wire split: first byte picks the slice cuts.
    for i, (seq, hq, hkv, d, dtype) in enumerate([(4, 2, 1, 8, 1), (8, 4, 2, 16, 3), (2, 1, 1, 4, 2)]):
        body = attend_request(seq, hq, hkv, d, dtype)
        write("tensor_wire_fuzzer", f"attend_{i}", bytes([0x1B * (i + 1) & 0xFF]) + body)
    write("tensor_wire_fuzzer", "repeated_q", b"\x05" + attend_request(2, 1, 1, 4) +
          field_bytes(2, field_bytes(4, b"\x00" * 16)))

    # Validation: requests and headers (the same bytes parse as both kinds where they fit).
    write("attend_request_fuzzer", "valid_bf16", attend_request(4, 2, 1, 8))
    write("attend_request_fuzzer", "valid_fp32", attend_request(8, 4, 2, 16, dtype=3))
    write("attend_request_fuzzer", "header_only", attend_request(16, 4, 4, 64, data=False))
    write("attend_request_fuzzer", "bad_heads", attend_request(4, 3, 2, 8))

    # Stream assembler: [u32 length][AttendStreamRequest]...
    def framed(message):
        return struct.pack("<I", len(message)) + message

    header = field_bytes(1, attend_request(2, 1, 1, 4, data=False))
    def chunk(name, offset, data):
        return field_bytes(2, field_varint(1, name) + field_varint(2, offset) + field_bytes(3, data))
    whole = framed(header)
    for name in (1, 2, 3):
        whole += framed(chunk(name, 0, b"\x11" * 8)) + framed(chunk(name, 8, b"\x22" * 8))
    write("attend_stream_assembler_fuzzer", "complete", whole)
    write("attend_stream_assembler_fuzzer", "out_of_order",
          framed(header) + framed(chunk(2, 8, b"\x00" * 8)))
    write("attend_stream_assembler_fuzzer", "chunk_first", framed(chunk(1, 0, b"\x00" * 4)))

    # Prefill requests against a 512-token vocab, 3 layers.
    ids = field_bytes(2, b"".join(varint(t) for t in (1, 2, 3, 500)))
    write("prefill_request_fuzzer", "full", field_bytes(1, b"p") + ids)
    write("prefill_request_fuzzer", "range", ids + field_varint(4, 2) + field_varint(5, 1) +
          field_varint(6, 3) + field_varint(7, 3) + field_varint(8, 1))
    write("prefill_request_fuzzer", "top_k", ids + field_varint(9, 2) + field_varint(10, 5))

    # safetensors files.
    def safetensors(entries, metadata=None):
        header = {}
        offset = 0
        blobs = b""
        for name, dtype, shape, size in entries:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
            blobs += b"\x00" * size
        if metadata:
            header["__metadata__"] = metadata
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + blobs

    write("safetensors_fuzzer", "two", safetensors(
        [("a", "BF16", [2, 3], 12), ("b.weight", "F32", [4], 16)], {"format": "pt"}))
    write("safetensors_fuzzer", "f16", safetensors([("x", "F16", [1, 1, 2], 4)]))
    write("safetensors_fuzzer", "empty", safetensors([]))
    write("safetensors_fuzzer", "entries", bytes([0, 2, 3, 4, 1, ord("w"), 2, 1, 2, 2, ord("a"), ord("b")]))

    # config.json files.
    llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
             "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0}
    write("model_config_fuzzer", "llama.json", json.dumps(llama).encode())
    llama3 = dict(llama, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    write("model_config_fuzzer", "llama3.json", json.dumps(llama3).encode())
    qwen = dict(llama, architectures=["Qwen2ForCausalLM"], head_dim=16)
    write("model_config_fuzzer", "qwen2.json", json.dumps(qwen).encode())


if __name__ == "__main__":
    main()
