"""One layer's causal attention, forward and backward, bf16 on CPU: PyTorch's SDPA, blocked_attention.py and
attention_bf16.c (cpu_attention.py) side by side, at the enwik8 shape by default (benchmarks/README.md, session 10):

    .venv/bin/python benchmarks/experiments/attention_layer.py [--batch 8] [--seq 512] [--heads 8] [--kv-heads 1]
        [--head-dim 64]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from palmchat.model import cpu_attention
from palmchat.model.blocked_attention import blocked_causal_attention


def main():
    ap = argparse.ArgumentParser()
    for name, default in (("batch", 8), ("seq", 512), ("heads", 8), ("kv-heads", 1), ("head-dim", 64)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    B, T, H, Hkv, D = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    kernels = {"PyTorch SDPA": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                               enable_gqa=True),
               "blocked_attention.py": blocked_causal_attention}
    if cpu_attention.KERNEL is not None:
        kernels["attention_bf16.c" + (" (AMX)" if cpu_attention.KERNEL[1] and D % 32 == 0 else " (AVX512-BF16)")] = \
            cpu_attention.causal_attention
    q = torch.randn(B, H, T, D, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, Hkv, T, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn(B, H, T, D, dtype=torch.bfloat16)
    times = {name: ([], []) for name in kernels}
    for rep in range(args.reps + 3):  # interleaved, the first 3 rounds as warm-up
        for name, attention in kernels.items():
            start = time.perf_counter()
            out = attention(q, k, v)
            middle = time.perf_counter()
            out.backward(grad)
            if rep >= 3:
                times[name][0].append(middle - start)
                times[name][1].append(time.perf_counter() - middle)
    print(f"batch {B} x {T} tokens, {H} heads x {D}, {Hkv} K/V head(s), bf16, {torch.get_num_threads()} threads; "
          f"median of {args.reps}")
    for name, (forward, backward) in times.items():
        print(f"  {name:34s} forward {statistics.median(forward) * 1e3:6.2f} ms   "
              f"backward {statistics.median(backward) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
