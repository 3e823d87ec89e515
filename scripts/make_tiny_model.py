#!/usr/bin/python3
"""Writes small deterministic Llama/Qwen2 checkpoints (config.json + safetensors) for tests and
benchmarks, in the layout transformers saves.

  make_tiny_model.py --preset=NAME --out=DIR [--dtype=fp32|bf16|fp16] [--shards=K]
  make_tiny_model.py --preset=NAME --print_ids=N     # the preset's deterministic prompt
  make_tiny_model.py --list

Needs numpy only (run it with /usr/bin/python3 on Debian). Weights come from integer streams
(numpy's PCG64 bit generator, one stream per tensor keyed by the preset seed and a CRC-32 of the
tensor name), mapped to uniform floats, so every numpy version writes identical files. Scales keep
activations O(1) through the layers: linear weights uniform with std 1/sqrt(fan_in), embeddings
with std 1, norm weights 1 +- 0.1, Qwen2 biases uniform in [-0.5, 0.5].
"""

import argparse
import json
import math
import os
import sys
import zlib

import numpy as np

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS = {
    # Llama 2 style: default RoPE, GQA 2, untied lm_head, head_dim derived (absent from config).
    "llama-tiny": dict(
        architecture="LlamaForCausalLM", layers=2, hidden=64, intermediate=176, heads=4,
        kv_heads=2, head_dim=None, vocab=512, rope_theta=10000.0, rope_scaling=None, tie=False,
        eps=1e-5, max_positions=4096, seed=1, dtype="bf16"),
    # Llama 3.x style: llama3 RoPE scaling, GQA 4, tied embeddings, explicit head_dim that is not
    # hidden / heads (o_proj is [96, 128]). With theta 5e5 and d 16 the frequencies fall in all
    # three llama3 regimes (kept, interpolated, divided by factor).
    "llama3-tiny": dict(
        architecture="LlamaForCausalLM", layers=3, hidden=96, intermediate=256, heads=8,
        kv_heads=2, head_dim=16, vocab=640, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
        tie=True, eps=1e-5, max_positions=131072, seed=2, dtype="bf16"),
    # Qwen2: q/k/v biases, GQA 2, theta 1e6.
    "qwen2-tiny": dict(
        architecture="Qwen2ForCausalLM", layers=2, hidden=64, intermediate=160, heads=4,
        kv_heads=2, head_dim=None, vocab=544, rope_theta=1000000.0, rope_scaling=None, tie=False,
        eps=1e-6, max_positions=32768, seed=3, dtype="bf16"),
    # Head dims the CUDA attention kernels serve (64, 128): what the GPU engine is tested on.
    # Llama 3 style, GQA 4 (an even ratio), d 128.
    "llama3-gpu-tiny": dict(
        architecture="LlamaForCausalLM", layers=2, hidden=256, intermediate=512, heads=8,
        kv_heads=2, head_dim=128, vocab=1024, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
        tie=True, eps=1e-5, max_positions=131072, seed=5, dtype="bf16"),
    # Qwen2 style with biases, GQA 3 (an odd ratio: the one-head anchor and mma.sync stripe
    # kernels), d 64.
    "qwen2-gpu-tiny": dict(
        architecture="Qwen2ForCausalLM", layers=2, hidden=384, intermediate=640, heads=6,
        kv_heads=2, head_dim=None, vocab=768, rope_theta=1000000.0, rope_scaling=None, tie=False,
        eps=1e-6, max_positions=32768, seed=6, dtype="bf16"),
    # Llama-3.2-1B shape (about 1.24 B parameters) for throughput measurements.
    "llama-1b": dict(
        architecture="LlamaForCausalLM", layers=16, hidden=2048, intermediate=8192, heads=32,
        kv_heads=8, head_dim=64, vocab=128256, rope_theta=500000.0,
        rope_scaling=dict(LLAMA3_SCALING, factor=32.0), tie=True, eps=1e-5,
        max_positions=131072, seed=4, dtype="bf16"),
}

DTYPES = {"fp32": ("F32", "float32", 4), "bf16": ("BF16", "bfloat16", 2),
          "fp16": ("F16", "float16", 2)}

# Elements drawn per call, to bound memory on the 1B preset.
CHUNK = 1 << 22


def uniform_stream(seed, name, count):
    """Yields float64 arrays of values uniform in [-1, 1), `count` in all, deterministically."""
    bits = np.random.PCG64([seed, zlib.crc32(name.encode("utf-8"))])
    done = 0
    while done < count:
        n = min(CHUNK, count - done)
        raw = bits.random_raw(n)
        yield (raw >> np.uint64(11)).astype(np.float64) * (2.0 / 9007199254740992.0) - 1.0
        done += n


def to_bytes(values32, dtype):
    """float32 array -> little-endian bytes of `dtype` (round to nearest even)."""
    if dtype == "fp32":
        return values32.astype("<f4").tobytes()
    if dtype == "fp16":
        return values32.astype("<f2").tobytes()
    bits = values32.view(np.uint32).astype(np.uint64)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = np.where(is_nan, (bits >> 16) | 0x40, rounded)
    return rounded.astype("<u2").tobytes()


def tensor_specs(p):
    """[(name, shape, kind)] of every tensor; kind picks the initialization."""
    h, inter = p["hidden"], p["intermediate"]
    d = p["head_dim"] or h // p["heads"]
    q, kv = p["heads"] * d, p["kv_heads"] * d
    specs = [("model.embed_tokens.weight", (p["vocab"], h), "embedding")]
    for i in range(p["layers"]):
        pre = "model.layers.%d." % i
        specs += [
            (pre + "input_layernorm.weight", (h,), "norm"),
            (pre + "self_attn.q_proj.weight", (q, h), "linear"),
            (pre + "self_attn.k_proj.weight", (kv, h), "linear"),
            (pre + "self_attn.v_proj.weight", (kv, h), "linear"),
            (pre + "self_attn.o_proj.weight", (h, q), "linear"),
            (pre + "post_attention_layernorm.weight", (h,), "norm"),
            (pre + "mlp.gate_proj.weight", (inter, h), "linear"),
            (pre + "mlp.up_proj.weight", (inter, h), "linear"),
            (pre + "mlp.down_proj.weight", (h, inter), "linear"),
        ]
        if p["architecture"] == "Qwen2ForCausalLM":
            specs += [(pre + "self_attn.%s_proj.bias" % x, (n,), "bias")
                      for x, n in (("q", q), ("k", kv), ("v", kv))]
    specs.append(("model.norm.weight", (h,), "norm"))
    if not p["tie"]:
        specs.append(("lm_head.weight", (p["vocab"], h), "linear"))
    return sorted(specs)


def tensor_chunks(p, name, shape, kind, dtype):
    """Yields the tensor's bytes in `dtype`, chunk by chunk."""
    count = int(np.prod(shape))
    if kind == "embedding":
        offset, scale = 0.0, math.sqrt(3.0)
    elif kind == "linear":
        offset, scale = 0.0, math.sqrt(3.0 / shape[1])
    elif kind == "norm":
        offset, scale = 1.0, 0.1
    else:  # bias
        offset, scale = 0.0, 0.5
    for u in uniform_stream(p["seed"], name, count):
        yield to_bytes((offset + scale * u).astype(np.float32), dtype)


def config_json(p, dtype):
    c = {
        "architectures": [p["architecture"]],
        "model_type": "llama" if p["architecture"] == "LlamaForCausalLM" else "qwen2",
        "vocab_size": p["vocab"],
        "hidden_size": p["hidden"],
        "intermediate_size": p["intermediate"],
        "num_hidden_layers": p["layers"],
        "num_attention_heads": p["heads"],
        "num_key_value_heads": p["kv_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": p["max_positions"],
        "rms_norm_eps": p["eps"],
        "rope_theta": p["rope_theta"],
        "rope_scaling": p["rope_scaling"],
        "tie_word_embeddings": p["tie"],
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": DTYPES[dtype][1],
    }
    if p["head_dim"] is not None:
        c["head_dim"] = p["head_dim"]
    if p["architecture"] == "LlamaForCausalLM":
        c.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=p["layers"])
    return json.dumps(c, indent=2, sort_keys=True) + "\n"


def write_safetensors(path, entries, metadata=None):
    """entries: [(name, dtype_code 'F32'|'BF16'|'F16', shape, nbytes, chunk_iterable)], written in
    the given order; the header is padded with spaces to a multiple of 8 bytes."""
    header = {}
    offset = 0
    for name, code, shape, nbytes, _ in entries:
        header[name] = {"dtype": code, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, _, _, nbytes, chunks in entries:
            written = 0
            for chunk in chunks:
                f.write(chunk)
                written += len(chunk)
            if written != nbytes:
                raise RuntimeError("%s: wrote %d bytes, expected %d" % (name, written, nbytes))


def generate(preset, out_dir, dtype=None, shards=1):
    """Writes the preset's checkpoint into out_dir; returns the file names written."""
    p = PRESETS[preset]
    dtype = dtype or p["dtype"]
    code, _, size = DTYPES[dtype]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(config_json(p, dtype))
    specs = tensor_specs(p)

    def entry(spec):
        name, shape, kind = spec
        return (name, code, shape, int(np.prod(shape)) * size,
                tensor_chunks(p, name, shape, kind, dtype))

    for stale in ("model.safetensors", "model.safetensors.index.json"):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    if shards <= 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), [entry(s) for s in specs],
                          {"format": "pt"})
        return ["config.json", "model.safetensors"]
    # Consecutive tensors (sorted by name) split into `shards` groups of similar byte size.
    total = sum(int(np.prod(s[1])) * size for s in specs)
    groups = [[] for _ in range(shards)]
    running = 0
    for s in specs:
        nbytes = int(np.prod(s[1])) * size
        groups[min(shards - 1, running * shards // max(total, 1))].append(s)
        running += nbytes
    groups = [g for g in groups if g]
    weight_map = {}
    files = ["config.json"]
    for i, group in enumerate(groups):
        fname = "model-%05d-of-%05d.safetensors" % (i + 1, len(groups))
        write_safetensors(os.path.join(out_dir, fname), [entry(s) for s in group],
                          {"format": "pt"})
        weight_map.update({s[0]: fname for s in group})
        files.append(fname)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
                  sort_keys=True)
        f.write("\n")
    files.append("model.safetensors.index.json")
    return files


def prompt_ids(preset, n):
    """n deterministic token ids in [0, vocab) for the preset."""
    p = PRESETS[preset]
    raw = np.random.PCG64([p["seed"], 0x50524F4D]).random_raw(n)  # 'PROM'
    return [int(x) for x in raw % np.uint64(p["vocab"])]


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--out")
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--print_ids", type=int, metavar="N",
                        help="print N prompt ids (comma-separated) instead of writing a model")
    parser.add_argument("--list", action="store_true", help="list the presets")
    args = parser.parse_args(argv)
    if args.list:
        for name in sorted(PRESETS):
            print(name)
        return 0
    if not args.preset:
        parser.error("--preset is required")
    if args.print_ids is not None:
        if args.print_ids < 0:
            parser.error("--print_ids must be >= 0")
        print(",".join(str(i) for i in prompt_ids(args.preset, args.print_ids)))
        return 0
    if not args.out:
        parser.error("--out is required")
    if args.shards < 1:
        parser.error("--shards must be >= 1")
    generate(args.preset, args.out, args.dtype, args.shards)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
