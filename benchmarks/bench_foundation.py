"""Foundation benchmark: palmchat's PaLM against the reference palm-rlhf-pytorch, side by side in one run.

    make bench                                   # installs palm-rlhf-pytorch (torch pinned), then runs this
    .venv/bin/python benchmarks/bench_foundation.py [--steps 4] [--new-tokens 128] [--shapes enwik8 small]

Measures, for two model shapes (see benchmarks/README.md):
1. training tokens/s (forward + backward + AdamW step) for each side in fp32 and under bf16 autocast;
2. batch-1 decode tokens/s: ours through palmchat.inference.Engine (KV cache; fp32 and bf16), the reference
   through its own generate (no KV cache: a full forward over the whole sequence per new token);
3. training model-FLOPs utilisation against this machine's measured matmul peak for the dtype;
4. our decode as a fraction of the memory-bandwidth limit (bytes read per token / copy bandwidth).

Timing: a warm-up, then the sides' steps interleaved (ours, ref, ours, ref, ...) and the median of each taken,
so that load from other processes on a shared machine hits both sides alike. Nothing is installed here.

bf16 arithmetic (training under autocast, bf16 matmul peaks, autocast decode) is timed only where the CPU runs it
natively (AVX512-BF16 or AMX, as palmchat's `--dtype auto` decides): below that PyTorch emulates it at a few
hundred MFLOP/s and one setting would take hours. bf16 *weights* are timed everywhere: the decode kernels widen
them in registers (decode_avx2.c).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

try:
    from palm_rlhf_pytorch import PaLM as RefPaLM
except ImportError:
    print("the reference implementation palm-rlhf-pytorch is not importable: run `make bench`, which installs it\n"
          '(pip install -q palm-rlhf-pytorch "torch==2.13.0") and then runs this script')
    sys.exit(1)

from palmchat.inference.engine import Engine, SamplingParams
from palmchat.inference.fused_block import unfuse_blocks
from palmchat.kernels import cpu_attention
from palmchat.kernels.blocked_attention import SDPA_IS_FASTER_ON_THIS_CPU
from palmchat.kernels.cpu_linear import KERNEL_NAMES, bf16_kernel, decode_kernel_level, onednn_only
from palmchat.model.config import ModelConfig, preset
from palmchat.model.transformer import Transformer
from palmchat.utils import cpu
from palmchat.utils.device import cpu_has_bf16

warnings.filterwarnings("ignore", message=".*sdp_kernel.*")  # the reference's flash path uses a deprecated API

BATCH, SEQ = 8, 512  # training batch: 8 sequences of 512 tokens
PROMPT = 64  # decode: tokens of prompt before the timed generation

SHAPES = {
    # the reference's enwik8 script shape: dim 512, depth 8, 8 heads x 64, multi-query, byte vocabulary
    "enwik8": ModelConfig(vocab_size=256, dim=512, n_layers=8, n_heads=8, n_kv_heads=1, max_seq_len=512),
    # our `small` preset with a 4096-token vocabulary
    "small": preset("small", vocab_size=4096),
}


def fmt(x: float) -> str:
    return f"{x:.3g}"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(xs):
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


# Peaks are the best of several repeats: load from other processes can only make a repeat slower.


def matmul_flops(dtype: torch.dtype, m: int = 2048, k: int = 2048, n: int = 2048, reps: int = 8) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    return 2 * m * k * n / min(timed(lambda: a @ b) for _ in range(reps))


def model_matmul_flops(config: ModelConfig, dtype: torch.dtype) -> float:
    """The best rate of the shape's own training matmuls (batch x seq tokens through the fused input projection
    and the two output projections): on this CPU they run a little faster than 2048^3."""
    tokens, widths = BATCH * SEQ, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim + 2 * config.ffn_hidden
    return max(matmul_flops(dtype, tokens, config.dim, widths, reps=4),
               matmul_flops(dtype, tokens, config.ffn_hidden, config.dim, reps=4),
               matmul_flops(dtype, tokens, config.dim, config.dim, reps=4))


def copy_bandwidth(mbytes: int = 256, reps: int = 10) -> float:
    """bytes read + written per second by Tensor.copy_ of a buffer much larger than the caches."""
    src = torch.ones(mbytes * 2**20 // 4)
    dst = torch.ones_like(src)  # touched: no page faults in the timed copies
    dst.copy_(src)
    return 2 * src.numel() * 4 / min(timed(lambda: dst.copy_(src)) for _ in range(reps))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def reference(config: ModelConfig, flash: bool = False) -> torch.nn.Module:
    assert config.block == "parallel" and config.n_kv_heads == 1 and config.ffn_hidden == 4 * config.dim
    return RefPaLM(num_tokens=config.vocab_size, dim=config.dim, depth=config.n_layers, heads=config.n_heads,
                   dim_head=config.head_dim, flash_attn=flash)


def train_step(model, loss_fn, bf16: bool):
    # fused AdamW on both sides: what `palmchat pretrain` uses; the optimizer belongs to neither model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_train(config: ModelConfig, steps: int) -> dict[str, list[float]]:
    """Seconds of each timed step per setting name, e.g. 'ours bf16', 'ref fp32'."""
    data = torch.randint(1, config.vocab_size, (BATCH, SEQ + 1))  # the reference ignores token 0 in its loss

    def ours_loss(m):
        logits = m(data[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), data[:, 1:].flatten())

    def ref_loss(m):
        return m(data, return_loss=True)

    results = {}
    for dtype in ("fp32", "bf16") if cpu_has_bf16() else ("fp32",):
        bf16 = dtype == "bf16"
        torch.manual_seed(0)
        sides = {f"ours {dtype}": train_step(Transformer(config), ours_loss, bf16),
                 f"ref {dtype}": train_step(reference(config), ref_loss, bf16)}
        if bf16:  # the reference's own enwik8 script turns on its flash-attention path
            sides["ref bf16 flash"] = train_step(reference(config, flash=True), ref_loss, bf16)
            # what `palmchat pretrain --compile` does (the warm-up step below pays the compilation)
            sides["ours bf16 compiled"] = train_step(torch.compile(Transformer(config)), ours_loss, bf16)
        for step in sides.values():
            step()  # warm-up
        times = {name: [] for name in sides}
        for _ in range(steps):
            for name, step in sides.items():
                times[name].append(timed(step))
        results.update(times)
        del sides
    return results


def bench_decode(config: ModelConfig, new_tokens: int, reps: int) -> dict[str, dict]:
    """Batch-1 generation of `new_tokens` after a PROMPT-token prompt.
    Returns per setting: tokens/s of the whole generate call, and for ours the decode-step rate (prefill excluded)."""
    torch.manual_seed(0)
    model = Transformer(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT))
    results = {}

    # name -> (engine, autocast?, dtype the weights are read in for the bandwidth bound)
    engines = {
        "ours fp32, model as is": (Engine(model), False, torch.float32),
        "ours bf16 autocast": (Engine(model), True, None),  # re-casts every weight at every step
        "ours fp32 packed copy": (Engine(model, dtype=torch.float32), False, torch.float32),
        "ours bf16 packed copy": (Engine(model, dtype=torch.bfloat16), False, torch.bfloat16),
        "ours bf16, blocks op by op": (Engine(model, dtype=torch.bfloat16), False, torch.bfloat16),
        "ours bf16, oneDNN only": (Engine(model, dtype=torch.bfloat16), False, torch.bfloat16),
    }
    if not cpu_has_bf16():  # no bf16 arithmetic; bf16 weights only through a decode kernel, which widens them
        del engines["ours bf16 autocast"]
        if bf16_kernel() is None:
            engines = {name: e for name, e in engines.items() if "bf16" not in name}
    if "ours bf16 packed copy" in engines:
        # the same copy with its blocks run op by op in PyTorch (linears still through the C kernel's gemv) ...
        unfuse_blocks(engines["ours bf16, blocks op by op"][0].sync())
        onednn = engines["ours bf16, oneDNN only"][0]
        onednn_only(onednn.sync(), onednn.packed_head)  # ... and with no C kernel at all
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    one = SamplingParams(max_new_tokens=1, temperature=0.0)
    for name, (engine, autocast, dtype) in engines.items():
        def gen(params, engine=engine, autocast=autocast):  # bound now: the loop moves on
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                engine.generate(prompt.tolist(), params)

        gen(SamplingParams(max_new_tokens=8, temperature=0.0))  # warm-up; builds the inference copies
        full, first = [], []
        for _ in range(reps):
            full.append(timed(lambda: gen(greedy)))
            first.append(timed(lambda: gen(one)))  # prefill + first token
        t_full, t_first = median(full), median(first)
        results[name] = {"tokens/s": new_tokens / t_full, "dtype": dtype,
                         "step/s": (new_tokens - 1) / max(t_full - t_first, 1e-9)}

    ref = reference(config)  # random weights: speed only
    for dtype in ("fp32", "bf16") if cpu_has_bf16() else ("fp32",):
        def run(dtype=dtype):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                # cheapest settings its generate offers: no logit filter (it always adds gumbel noise)
                ref.generate(PROMPT + new_tokens, prompt, filter_logits_fn=None, temperature=1.0)

        ref.generate(PROMPT + 4, prompt, filter_logits_fn=None)  # warm-up
        results[f"ref {dtype}"] = {"tokens/s": new_tokens / timed(run)}
    return results


def decode_bytes_per_token(config: ModelConfig, dtype: torch.dtype, avg_len: float) -> float:
    """Bytes a batch-1 decode step must read: every weight once (the tied embedding as the output projection)
    plus the K and V cache at the average sequence length."""
    size = torch.finfo(dtype).bits // 8
    weights = config.num_params(include_embedding=False) + config.vocab_size * config.dim
    kv = config.n_layers * 2 * config.n_kv_heads * config.head_dim * avg_len
    return (weights + kv) * size


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per setting (after one warm-up)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated in the decode benchmark")
    ap.add_argument("--reps", type=int, default=3, help="timed generate calls per setting of ours")
    args = ap.parse_args()

    start = time.perf_counter()
    attention = ("attention_bf16.c on AMX tiles" if cpu_attention.ON_THIS_CPU
                 else "PyTorch's SDPA" if SDPA_IS_FASTER_ON_THIS_CPU else "blocked_attention.py")
    cap = f" (capped by {cpu.MAX_ISA_VARIABLE}; the CPU has {cpu.detected_isa()})" if cpu.max_isa() else ""
    print(f"CPU level palmchat uses: {cpu.cpu_isa()}{cap}; bf16 arithmetic "
          + ("native: timed" if cpu_has_bf16() else "emulated by PyTorch: not timed (fp32 only)"))
    decode = decode_kernel_level()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; palmchat's bf16 decode kernel: "
          f"{KERNEL_NAMES[decode] if decode else 'not available'}; bf16 training attention: {attention}")
    peak = {"fp32": matmul_flops(torch.float32)}
    if cpu_has_bf16():
        peak["bf16"] = matmul_flops(torch.bfloat16)
    print("machine: matmul 2048^3 " + ", ".join(f"{k} {fmt(v / 1e12)} TFLOP/s" for k, v in peak.items())
          + f"; copy bandwidth {fmt(copy_bandwidth() / 1e9)} GB/s (read + written)")

    ratios = []
    for shape in args.shapes:
        config = SHAPES[shape]
        flops = config.flops_per_token(SEQ)
        print(f"\n== {shape}: dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads x {config.head_dim}, "
              f"{config.n_kv_heads} kv head(s), vocab {config.vocab_size}; "
              f"{fmt(config.num_params() / 1e6)}M parameters, {fmt(flops / 1e6)} MFLOP/token (train, seq {SEQ})")

        steps = bench_train(config, args.steps)
        train = {name: BATCH * SEQ / median(t) for name, t in steps.items()}  # tokens/s of the median step
        print(f"training, batch {BATCH} x {SEQ} tokens, median of {args.steps} steps (fastest step alongside):")
        print(f"  {'setting':<28}{'tokens/s':>10}{'s/step':>9}{'fastest':>9}{'MFU':>8}")
        for name, rate in train.items():
            mfu = rate * flops / peak["bf16" if "bf16" in name else "fp32"]  # bf16 settings only with its peak
            print(f"  {name:<28}{fmt(rate):>10}{fmt(BATCH * SEQ / rate):>9}{fmt(min(steps[name])):>9}{mfu:>8.1%}")
        best_ours = max((r, n) for n, r in train.items() if n.startswith("ours"))
        best_ref = max((r, n) for n, r in train.items() if n.startswith("ref"))
        # roofline: every counted FLOP at the best matmul rate this machine reaches on the shape's own matmuls,
        # with zero time for everything else -- no implementation of this model trains faster than that
        fastest = "bf16" if "bf16" in peak else "fp32"
        dtype = torch.bfloat16 if fastest == "bf16" else torch.float32
        best_rate = max(peak[fastest], model_matmul_flops(config, dtype))
        ceiling = best_rate / flops
        print(f"  roofline: all {fmt(flops / 1e6)} MFLOP/token at {fmt(best_rate / 1e12)} TFLOP/s (best {fastest} "
              f"matmul rate on this shape) = {fmt(ceiling)} tokens/s = {ceiling / best_ref[0]:.2f}x the reference's "
              "best")

        # the memory bandwidth this VM gets drifts over minutes: measure it right before and after the decode runs
        before = copy_bandwidth()
        decode = bench_decode(config, args.new_tokens, args.reps)
        bandwidth = max(before, copy_bandwidth())
        avg_len = PROMPT + args.new_tokens / 2
        print(f"decode, batch 1, {PROMPT}-token prompt, {args.new_tokens} new tokens; bound = copy bandwidth "
              f"{fmt(bandwidth / 1e9)} GB/s / bytes read per token (weights + KV cache at length {avg_len:g}):")
        print(f"  {'setting':<28}{'tokens/s':>10}{'steps/s':>10}{'bound':>10}{'of bound':>10}")
        fraction = {}
        for name, r in decode.items():
            line = f"  {name:<28}{fmt(r['tokens/s']):>10}"
            if "step/s" in r:
                line += f"{fmt(r['step/s']):>10}"
            if r.get("dtype") is not None:
                bound = bandwidth / decode_bytes_per_token(config, r["dtype"], avg_len)
                fraction[name] = r["step/s"] / bound
                line += f"{fmt(bound):>10}{fraction[name]:>10.2f}"
            print(line)
        dec_ours = max((r["tokens/s"], n) for n, r in decode.items() if n.startswith("ours"))
        dec_ref = max((r["tokens/s"], n) for n, r in decode.items() if n.startswith("ref"))

        ratios.append(f"train tokens/s ratio (ours/ref, best settings, {shape} shape): "
                      f"{best_ours[0] / best_ref[0]:.3g}x ({best_ours[1]} vs {best_ref[1]}); roofline ceiling for "
                      f"any implementation {ceiling / best_ref[0]:.2f}x")
        if "ours bf16" in train:
            ratios.append(f"train tokens/s ratio (ours/ref, bf16 autocast, {shape} shape): "
                          f"{train['ours bf16'] / max(train['ref bf16'], train['ref bf16 flash']):.3g}x")
        ratios += [
            f"train tokens/s ratio (ours/ref, fp32, {shape} shape): {train['ours fp32'] / train['ref fp32']:.3g}x",
            f"train MFU (ours, {shape} shape): " + ", ".join(
                f"{dtype} {train[f'ours {dtype}'] * flops / peak[dtype]:.1%}" for dtype in peak),
            f"decode tokens/s ratio (ours/ref, best settings, batch 1, {shape} shape): "
            f"{dec_ours[0] / dec_ref[0]:.3g}x ({dec_ours[1]} vs {dec_ref[1]})",
        ]
        if "ours bf16 packed copy" in decode:
            ratios += [
                f"decode fraction of memory-bandwidth limit (ours, bf16, {shape} shape): "
                f"{fraction['ours bf16 packed copy']:.2f}",
                f"decode steps/s, bf16 copy with its C decode kernel vs oneDNN only ({shape} shape): "
                f"{decode['ours bf16 packed copy']['step/s'] / decode['ours bf16, oneDNN only']['step/s']:.2f}x; "
                f"fused blocks vs op by op: "
                f"{decode['ours bf16 packed copy']['step/s'] / decode['ours bf16, blocks op by op']['step/s']:.2f}x",
            ]

    print("\n" + "\n".join(ratios))
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
