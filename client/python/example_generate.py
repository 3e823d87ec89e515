#!/usr/bin/env python3
"""Remote prefill on anchorserve, local decoding on a CPU host with Hugging Face transformers.

The server runs the prompt's prefill (AnchorAttention in every layer) and streams back every
layer's K and V; this host loads the same model from a local folder, turns the K/V into a
transformers DynamicCache and lets ``generate()`` continue from it.

The hand-off: the server prefills all prompt tokens but the last; ``generate()`` gets the whole
prompt and the cache, sees that the cache covers ``len(ids) - 1`` positions and computes only the
last prompt token locally, which yields the first new token.

    python3 client/python/example_generate.py --target=gpu-host:50051 \\
        --model=/models/Qwen2.5-0.5B-Instruct --prompt="The capital of France is" \\
        --max_new_tokens=32 --compare

Needs: numpy, grpcio, protobuf (the client) and torch + transformers (5.x) on this host, the
generated stubs (client/python/generate_stubs.sh), and the server started with --model on the same
model (the architecture, layer and head counts and vocabulary are checked against the local
config; --expected_fingerprint is taken from the server so a model swap mid-run fails).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import anchorserve_client  # noqa: E402


def check_same_model(info, config) -> None:
    """Exits unless the server's model has the local model's shape."""
    text_config = config.get_text_config() if hasattr(config, 'get_text_config') else config
    local = {
        'architecture': (config.architectures or ['?'])[0],
        'num_layers': text_config.num_hidden_layers,
        'num_kv_heads': getattr(text_config, 'num_key_value_heads',
                                text_config.num_attention_heads),
        'head_dim': getattr(text_config, 'head_dim', None)
        or text_config.hidden_size // text_config.num_attention_heads,
        'vocab_size': text_config.vocab_size,
    }
    remote = {key: getattr(info, key) for key in local}
    if local != remote:
        sys.exit(f'the server holds a different model: server {remote}, local {local}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--target', default='127.0.0.1:50051', help='anchorserve host:port')
    parser.add_argument('--model', required=True, help='local Hugging Face model folder')
    parser.add_argument('--prompt', default='The three primary colours are')
    parser.add_argument('--max_new_tokens', type=int, default=32)
    parser.add_argument('--theta', type=float, default=None, help='AnchorAttention threshold')
    parser.add_argument('--dense', action='store_true', help='exact dense attention on the server')
    parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'],
                        help='dtype of the local model (and of the cache handed to it)')
    parser.add_argument('--compare', action='store_true',
                        help='also generate locally without the remote cache and compare')
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    info = anchorserve_client.model_info(args.target, timeout=30)
    check_same_model(info, AutoConfig.from_pretrained(args.model))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(args.prompt)['input_ids']
    if len(ids) < 2:
        sys.exit('the prompt needs at least 2 tokens (all but the last are prefilled remotely)')
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.eval()
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id

    # 1. Remote prefill of ids[:-1]: every layer's K/V, no logits needed.
    start = time.perf_counter()
    result = anchorserve_client.prefill(
        args.target, ids[:-1], theta=args.theta, dense=args.dense, kv_dtype='bf16',
        logits='none', expected_fingerprint=info.fingerprint, timeout=600)
    prefill_seconds = time.perf_counter() - start
    print(f'remote prefill: {len(ids) - 1} tokens in {prefill_seconds:.3f} s, '
          f'{result.kv_bytes / 2**20:.1f} MiB of K/V, density {result.metrics_proto.density:.4f}, '
          f'backend {result.metrics_proto.backend}')

    # 2. The cache, in the model's dtype; generate() computes only the last prompt token.
    cache = anchorserve_client.to_dynamic_cache(result, dtype=model.dtype)
    input_ids = torch.tensor([ids])
    attention_mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        start = time.perf_counter()
        output = model.generate(input_ids, attention_mask=attention_mask, past_key_values=cache,
                                max_new_tokens=args.max_new_tokens, do_sample=False,
                                pad_token_id=pad_token_id)
        decode_seconds = time.perf_counter() - start
    new_tokens = output[0, len(ids):].tolist()
    print(f'local decode:   {len(new_tokens)} tokens in {decode_seconds:.3f} s')
    print(args.prompt + tokenizer.decode(new_tokens, skip_special_tokens=True))

    if args.compare:
        with torch.inference_mode():
            start = time.perf_counter()
            local = model.generate(input_ids, attention_mask=attention_mask,
                                   max_new_tokens=args.max_new_tokens, do_sample=False,
                                   pad_token_id=pad_token_id)
            local_seconds = time.perf_counter() - start
        local_tokens = local[0, len(ids):].tolist()
        same = 0
        for remote_token, local_token in zip(new_tokens, local_tokens):
            if remote_token != local_token:
                break
            same += 1
        print(f'local only:     {len(local_tokens)} tokens in {local_seconds:.3f} s (prefill '
              f'included); the first {same} greedy tokens agree with the remote-prefill run')


if __name__ == '__main__':
    main()
