#!/usr/bin/env python3
"""The baseline of the prefill benchmark, on the GPU host: builds a random-initialised model of a
real model's shape with transformers, saves it as safetensors (for anchorserve to load), and times
transformers' own prefill of it (bf16, sdpa attention, use_cache=True) at the given lengths.

  prefill_baseline.py --shape=llama-3.1-8b --out=DIR --tokens=8192,32768 [--skip_save]

Prints one line per length: seconds (median of --repeats after one warm-up at the smallest
length), tokens/s, and peak device memory (torch.cuda.max_memory_allocated). Random weights:
attention is near uniform, so no sparsity claim comes from this model.
"""

import argparse
import os
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHAPES = {
    'llama-3.1-8b': dict(
        model_type='llama', architectures=['LlamaForCausalLM'], hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
    'qwen2.5-7b': dict(
        model_type='qwen2', architectures=['Qwen2ForCausalLM'], hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
        use_sliding_window=False),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--shape', choices=sorted(SHAPES), default='llama-3.1-8b')
    parser.add_argument('--out', required=True)
    parser.add_argument('--tokens', default='8192')
    parser.add_argument('--repeats', type=int, default=1)
    parser.add_argument('--skip_save', action='store_true')
    args = parser.parse_args()
    fields = dict(SHAPES[args.shape])
    model_type = fields.pop('model_type')
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device('cuda'):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 attn_implementation='sdpa').eval()
    print(f'{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, '
          f'built in {time.time() - t0:.1f} s', flush=True)
    if not args.skip_save:
        t0 = time.time()
        model.save_pretrained(args.out, safe_serialization=True)
        print(f'saved to {args.out} in {time.time() - t0:.1f} s', flush=True)
    lengths = [int(x) for x in args.tokens.split(',')]
    vocab = fields['vocab_size']
    with torch.no_grad():
        warm = torch.randint(0, vocab, (1, min(lengths)), device='cuda')
        model(warm, use_cache=True)
        for n in lengths:
            ids = torch.randint(0, vocab, (1, n), device='cuda')
            times = []
            torch.cuda.reset_peak_memory_stats()
            for _ in range(args.repeats):
                torch.cuda.synchronize()
                t0 = time.time()
                out = model(ids, use_cache=True)
                torch.cuda.synchronize()
                times.append(time.time() - t0)
                del out
            seconds = sorted(times)[len(times) // 2]
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f'transformers N={n}: {seconds:.3f} s, {n / seconds:.0f} tokens/s, '
                  f'peak device memory {peak:.1f} GiB', flush=True)
            torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
