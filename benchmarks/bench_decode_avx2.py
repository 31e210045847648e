"""Batch-1 decode on a CPU without AVX-512: which dtype to serve in, and how close to the memory bound it runs.

    PALMCHAT_MAX_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        .venv/bin/python benchmarks/bench_decode_avx2.py [--shapes small qwen2.5-0.5b] [--new-tokens 64]

On an AVX2-only CPU run it without the three variables; on one with AVX-512 or AMX they make palmchat, ATen and
oneDNN take the paths an AVX2-only CPU takes (palmchat/utils/cpu.py). Each setting is an Engine (palmchat's
inference engine) generating greedily from a model with random weights (speed only), one row:

- bf16 + C kernel: the bf16 inference copy; decode steps through the decode kernel this process picked
  (decode_avx2.c under the cap: bf16 weights widened to fp32 in registers), prefill in fp32 products;
- fp32: the fp32 inference copy (oneDNN's packed linears, blocks op by op in PyTorch);
- bf16 PyTorch: the model itself in bf16, every op PyTorch's own (emulated in fp32 on such a CPU);
- bf16 no C kernel: the bf16 copy with the C kernel switched off (cpu_linear.onednn_only and unfuse_blocks).

Decode tokens/s is 1 / the median time between streamed tokens (prefill and first token left out).
The bound is what memory allows: copy bandwidth (read + written, measured before and after the decode runs, the
better kept) / bytes a step reads (every weight once, the tied embedding as output projection, plus the KV cache
at the average length). The script prints the CPU, its flags and the caps in force, so no figure is read without
its machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from palmchat.inference.engine import Engine, SamplingParams
from palmchat.inference.fused_block import unfuse_blocks
from palmchat.kernels.cpu_linear import KERNEL_NAMES, decode_kernel_level, onednn_only
from palmchat.model.config import ModelConfig, preset
from palmchat.model.transformer import Transformer
from palmchat.utils import cpu

PROMPT = 16  # tokens of prompt: short, since PyTorch's emulated bf16 prefill is slow
SHAPES = {
    "small": lambda: preset("small", vocab_size=8192),  # the demo's tokenizer size
    # Qwen2.5-0.5B's shape, as benchmarks/bench_byom.py (no q/k/v biases): ~494M parameters, tied embeddings
    "qwen2.5-0.5b": lambda: ModelConfig(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                                        head_dim=64, ffn_hidden=4864, block="sequential", norm="rmsnorm",
                                        norm_eps=1e-6, rope_theta=1e6, tie_embeddings=True, max_seq_len=4096),
}
ISA_FLAGS = ("sse4_2", "avx", "f16c", "fma", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "asimd", "sve", "bf16")
CAPS = ("PALMCHAT_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_bandwidth(mbytes: int = 256, reps: int = 10) -> float:
    """Bytes read + written per second by Tensor.copy_ of a buffer much larger than the caches."""
    src = torch.ones(mbytes * 2**20 // 4)
    dst = torch.ones_like(src)  # touched: no page faults in the timed copies
    dst.copy_(src)
    return 2 * src.numel() * 4 / min(timed(lambda: dst.copy_(src)) for _ in range(reps))


def bytes_per_token(config: ModelConfig, dtype: torch.dtype, avg_len: float) -> float:
    size = torch.finfo(dtype).bits // 8
    weights = config.num_params(include_embedding=False) + config.vocab_size * config.dim
    kv = config.n_layers * 2 * config.n_kv_heads * config.head_dim * avg_len
    return (weights + kv) * size


def decode_rate(engine: Engine, prompt: list[int], new_tokens: int, reps: int) -> tuple[float, float]:
    """(decode steps per second, seconds to the first token). The rate is 1 / the median interval between
    consecutive streamed tokens over `reps` greedy runs (as benchmarks/bench_byom.py): prefill and first token
    left out, and on a shared machine a step whose thread was descheduled is an outlier, not the rate. The first
    token's time (prefill included) is the median over the runs."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    for _ in engine.stream([prompt], SamplingParams(max_new_tokens=4, temperature=0.0)):  # builds the copy
        pass
    intervals, first = [], []
    for _ in range(reps):
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in engine.stream([prompt], params)]
        first.append(stamps[0] - start)
        intervals += [b - a for a, b in zip(stamps, stamps[1:])]
    return 1 / statistics.median(intervals), statistics.median(first)


SETTINGS = ("bf16 + C kernel", "fp32", "bf16 no C kernel", "bf16 PyTorch")


def bench_shape(name: str, new_tokens: int, reps: int, settings: list[str]) -> list[tuple]:
    torch.manual_seed(0)
    config = SHAPES[name]()
    model = Transformer(config).eval().requires_grad_(False)
    prompt = torch.randint(0, config.vocab_size, (PROMPT,)).tolist()
    results = []
    if "bf16 + C kernel" in settings:
        engine = Engine(model, dtype=torch.bfloat16)
        results.append(("bf16 + C kernel", *decode_rate(engine, prompt, new_tokens, reps), torch.bfloat16))
        del engine
    if "fp32" in settings:
        engine = Engine(model, dtype=torch.float32)
        results.append(("fp32", *decode_rate(engine, prompt, new_tokens, reps), torch.float32))
        del engine
    if "bf16 no C kernel" in settings:  # slow: below AVX-512 every weight is widened to fp32 at every step
        engine = Engine(model, dtype=torch.bfloat16)
        onednn_only(engine.sync(), engine.packed_head)
        unfuse_blocks(engine.sync())
        results.append(("bf16 no C kernel", *decode_rate(engine, prompt, min(new_tokens, 16), reps), torch.bfloat16))
        del engine
    if "bf16 PyTorch" in settings:  # slow where emulated: few tokens, one run
        engine = Engine(model.to(torch.bfloat16))
        results.append(("bf16 PyTorch", *decode_rate(engine, prompt, min(new_tokens, 8), 1), torch.bfloat16))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timed run")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per setting (their intervals pooled)")
    ap.add_argument("--threads", type=int, default=2, help="torch (and OpenMP) threads")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS, metavar="SETTING",
                    help=f"which to time (default all): {', '.join(repr(s) for s in SETTINGS)}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    flags = cpu.cpu_flags()
    print(f"CPU: {cpu_model()} ({platform.machine()}), {os.cpu_count()} logical CPUs, {args.threads} threads used; "
          f"load average {os.getloadavg()[0]:.1f} (other processes share the CPUs)")
    print(f"ISA flags: {' '.join(f for f in ISA_FLAGS if f in flags) or '(none read)'}")
    caps = ", ".join(f"{v}={os.environ[v]}" for v in CAPS if os.environ.get(v)) or "none"
    print(f"palmchat CPU level: {cpu.cpu_isa()} (detected {cpu.detected_isa()}); caps: {caps}")
    level = decode_kernel_level()
    print(f"bf16 decode kernel: {KERNEL_NAMES[level] if level else 'none'}; torch {torch.__version__}, "
          f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")

    for name in args.shapes:
        before = copy_bandwidth()
        results = bench_shape(name, args.new_tokens, args.reps, args.settings)
        bandwidth = max(before, copy_bandwidth())
        config = SHAPES[name]()
        avg_len = PROMPT + args.new_tokens / 2
        print(f"\n{name} ({config.num_params() / 1e6:.0f}M parameters): batch-1 decode, {PROMPT}-token prompt; "
              f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + written); load average {os.getloadavg()[0]:.1f}")
        print(f"  {'setting':<20}{'tokens/s':>10}{'MB/token':>10}{'bound tok/s':>13}{'of bound':>10}"
              f"{'first token ms':>16}")
        for setting, rate, first, dtype in results:
            per_token = bytes_per_token(config, dtype, avg_len)
            bound = bandwidth / per_token
            print(f"  {setting:<20}{rate:>10.1f}{per_token / 1e6:>10.0f}{bound:>13.1f}{rate / bound:>10.2f}"
                  f"{first * 1e3:>16.0f}")
        rates = {setting: rate for setting, rate, _, _ in results}
        for peer in ("fp32", "bf16 no C kernel", "bf16 PyTorch"):
            if peer in rates and "bf16 + C kernel" in rates:
                print(f"  {name}: bf16 + C kernel / {peer}: {rates['bf16 + C kernel'] / rates[peer]:.2f}x")


if __name__ == "__main__":
    main()
