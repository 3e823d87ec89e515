#!/usr/bin/env python3
"""Dense causal baseline for anchor_attention_microbench: torch SDPA (cuDNN on H100 with
PyTorch 2.11) on the same shape: batch 1, Hq 32, Hkv 8, d 128, bf16, causal, enable_gqa.

FLOPs = 4 * N^2 * d * Hq / 2. CUDA events around each call, warm-up first, median of repeats.

Usage: python3 sdpa_baseline.py [--heads=HQ,HKV] [N ...]
       (default heads 32,8; lengths 4096 8192 16384 32768 65536 131072)
"""
import statistics
import sys

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128


def time_ms(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main():
    global HQ, HKV
    args = sys.argv[1:]
    for a in [a for a in args if a.startswith("--heads=")]:  # --heads=28,4 for Qwen2.5-7B
        HQ, HKV = (int(x) for x in a.split("=", 1)[1].split(","))
        args.remove(a)
    lengths = [int(a) for a in args] or [4096, 8192, 16384, 32768, 65536, 131072]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cudnn {torch.backends.cudnn.version()}, heads {HQ}/{HKV}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n in lengths:
        q = torch.rand(1, HQ, n, D, device="cuda", dtype=torch.bfloat16, generator=gen) * 6 - 3
        k = torch.rand(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen) * 2 - 1
        v = torch.rand(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen) * 2 - 1

        def run():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        reps = 3 if n >= 131072 else 5 if n >= 65536 else 10
        ms = time_ms(run, 2, reps)
        flops = 4.0 * n * n * D * HQ / 2.0
        print(f"sdpa   N={n:6d}            ms={ms:9.3f}  TFLOP/s={flops / ms * 1e-9:6.1f}",
              flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
