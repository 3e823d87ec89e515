#!/usr/bin/env python3
"""Writes golden K/V caches and last logits from Hugging Face transformers for the tiny presets,
for tests/model/golden_test.cc to compare the prefill engines against.

  transformers_golden.py --out=tests/data/golden [--tokens=130] [--presets=a,b] [--device=cpu]

Needs torch, transformers (4.4x or 5.x) and numpy; no network. For every tiny preset it writes the
checkpoint with scripts/make_tiny_model.py (same seeds, default dtype), loads it with
AutoModelForCausalLM in float32 with eager attention, runs the preset's deterministic prompt
with use_cache=True, and writes <out>/<preset>.safetensors holding
  layers.{i}.k, layers.{i}.v   [Hkv, N, d] float32, post-RoPE, as in transformers' cache
  logits                       [vocab] float32, the last position
and string metadata: preset, prompt_ids, fingerprint (the engine's Model::fingerprint() of the
checkpoint), model_dtype, transformers_version, torch_version, numpy_version, cache_api.
Runs on the CPU by default (no TF32 there); --device=cuda disables TF32 explicitly.
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tiny_model  # noqa: E402  (same generator, same seeds)

TINY_PRESETS = ["llama-tiny", "llama3-tiny", "qwen2-tiny"]


def read_safetensors_header(path):
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(length))


def fingerprint(model_dir):
    """The engine's Model::fingerprint(): SHA-256 of FingerprintInput (model/model.h)."""
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        config = f.read()
    tensors = {}
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        header = read_safetensors_header(single)
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    else:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        headers = {}
        for name, shard in weight_map.items():
            if shard not in headers:
                headers[shard] = read_safetensors_header(os.path.join(model_dir, shard))
            tensors[name] = headers[shard][name]
    data = b"anchorserve-model-fingerprint-v1\nconfig.json %d\n" % len(config) + config + b"\n"
    for name in sorted(tensors, key=lambda s: s.encode("utf-8")):
        entry = tensors[name]
        data += ("%s %s %s\n" % (name, entry["dtype"],
                                 ",".join(str(d) for d in entry["shape"]))).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def cache_layers(cache):
    """[(keys, values)] per layer, [batch, Hkv, N, d], for the cache APIs transformers has had:
    5.x (and late 4.x) DynamicCache.layers[i].keys/.values, earlier DynamicCache.key_cache[i],
    and the legacy tuple of (k, v) pairs."""
    layers = getattr(cache, "layers", None)
    if layers is not None and len(layers) > 0 and hasattr(layers[0], "keys"):
        return [(layer.keys, layer.values) for layer in layers], "layers"
    if hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):
        return list(zip(cache.key_cache, cache.value_cache)), "key_cache"
    if isinstance(cache, (tuple, list)):
        return [(kv[0], kv[1]) for kv in cache], "legacy"
    if hasattr(cache, "to_legacy_cache"):
        return [(kv[0], kv[1]) for kv in cache.to_legacy_cache()], "to_legacy_cache"
    raise RuntimeError("unknown cache type %s" % type(cache).__name__)


def load_model(model_dir, torch, transformers):
    major = int(transformers.__version__.split(".")[0])
    kwargs = {"attn_implementation": "eager", "output_loading_info": True}
    # transformers 5 renamed torch_dtype to dtype.
    kwargs["dtype" if major >= 5 else "torch_dtype"] = torch.float32
    model, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    problems = {k: list(v) for k, v in info.items() if v}
    # A tied lm_head is reported missing by some versions; it is the embedding.
    with open(os.path.join(model_dir, "config.json")) as f:
        tied = json.load(f).get("tie_word_embeddings", False)
    if tied and "missing_keys" in problems:
        problems["missing_keys"] = [k for k in problems["missing_keys"] if k != "lm_head.weight"]
        if not problems["missing_keys"]:
            del problems["missing_keys"]
    if problems:
        raise RuntimeError("%s: loading problems %s" % (model_dir, problems))
    return model.eval()


def golden_for(preset, tokens, device, out_dir, torch, transformers):
    params = make_tiny_model.PRESETS[preset]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, preset)
        make_tiny_model.generate(preset, model_dir)
        fp = fingerprint(model_dir)
        model = load_model(model_dir, torch, transformers).to(device)
        if params["tie"]:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), \
                "lm_head is not tied to the embedding"
        ids = make_tiny_model.prompt_ids(preset, tokens)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], dtype=torch.long, device=device),
                        use_cache=True)
        layers, api = cache_layers(out.past_key_values)
        head_dim = params["head_dim"] or params["hidden"] // params["heads"]
        expected = (1, params["kv_heads"], tokens, head_dim)
        if len(layers) != params["layers"]:
            raise RuntimeError("%s: %d cache layers, expected %d" %
                               (preset, len(layers), params["layers"]))
        entries = []
        for i, (k, v) in enumerate(layers):
            for name, t in (("k", k), ("v", v)):
                if tuple(t.shape) != expected:
                    raise RuntimeError("%s layer %d %s: shape %s, expected %s" %
                                       (preset, i, name, tuple(t.shape), expected))
                array = t[0].detach().to("cpu", torch.float32).contiguous().numpy()
                entries.append(("layers.%d.%s" % (i, name), array))
        logits = out.logits[0, -1].detach().to("cpu", torch.float32).contiguous().numpy()
        if logits.shape != (params["vocab"],):
            raise RuntimeError("%s: logits shape %s" % (preset, logits.shape))
        entries.append(("logits", logits))
        entries.sort(key=lambda e: e[0])
        metadata = {
            "preset": preset,
            "prompt_ids": ",".join(str(i) for i in ids),
            "fingerprint": fp,
            "model_dtype": params["dtype"],
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "numpy_version": np.__version__,
            "cache_api": api,
            "device": str(device),
        }
        path = os.path.join(out_dir, preset + ".safetensors")
        make_tiny_model.write_safetensors(
            path,
            [(name, "F32", a.shape, a.nbytes, [a.astype("<f4").tobytes()]) for name, a in entries],
            metadata)
        top2 = np.sort(logits)[-2:]
        print("%s: %d tokens, %d layers, cache api %s, argmax %d (margin %.4g) -> %s" %
              (preset, tokens, len(layers), api, int(np.argmax(logits)), top2[1] - top2[0], path))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=130)
    parser.add_argument("--presets", default=",".join(TINY_PRESETS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import torch
    import transformers

    torch.manual_seed(0)  # nothing random is used; set for good measure
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    for preset in args.presets.split(","):
        if preset not in TINY_PRESETS:
            parser.error("unknown tiny preset %s" % preset)
        golden_for(preset, args.tokens, torch.device(args.device), args.out, torch, transformers)
    total = sum(os.path.getsize(os.path.join(args.out, p + ".safetensors"))
                for p in args.presets.split(","))
    print("total %d bytes" % total)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
