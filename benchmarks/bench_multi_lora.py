"""Multi-LoRA decode: a batch of 8 rows, each with its own LoRA adapter, against the base model alone at batch 8.

The server decodes requests of different adapters in one step (palmchat/model/lora.py: the base matmul shared by
the batch, then each row's A and B, gathered once per batch, in two batched matmuls). This measures what that costs
per decode step, the way the scheduler runs it: the engine's bf16 inference copy (packed linears), a KV cache of 8
rows holding a `--prompt`-token prompt each, one token per row per step, the output projection included. Target:
>= 0.7x the base's tokens/s (vLLM's published multi-LoRA cost is about 2x).

Rows: `base` (no adapter anywhere), `1 adapter` (every row the same one), `8 adapters` (each row its own), per rank.
Each configuration is timed `--reps` times in turns with the others, keeping the best (on a shared machine the
other work only ever slows a repetition down) and the median.
The model has random weights (only speed is measured) in the `small` shape. ~1 minute on 2 CPU cores.

    .venv/bin/python benchmarks/bench_multi_lora.py [--ranks 8 16] [--steps 64] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palmchat.inference.engine import Engine  # noqa: E402
from palmchat.inference.kv_cache import KVCache  # noqa: E402
from palmchat.model.config import preset  # noqa: E402
from palmchat.model.lora import add_lora, lora_layers, set_adapter, set_row_adapters  # noqa: E402
from palmchat.model.transformer import Transformer  # noqa: E402

BATCH = 8


def cpu_line() -> str:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    have = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512_bf16", "amx_tile"))
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs ({have})"


def model_with_adapters(rank: int, n: int, vocab: int) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(preset("small", vocab_size=vocab)).eval()
    for i in range(n):
        add_lora(model, f"a{i}", rank=rank, alpha=2 * rank)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B[f"a{i}"].normal_(std=0.02)  # trained-looking: not the zeros a new adapter starts with
    model.requires_grad_(False)
    return model


class Decoder:
    """The scheduler's decode step on a fixed batch: the engine's runner, a KV cache of BATCH prompts."""

    def __init__(self, model: Transformer, rows: list[str | None] | None, prompt: int, steps: int):
        if rows is not None:
            set_row_adapters(model, rows)
        else:
            set_adapter(model, None)
        self.engine = Engine(model, dtype=torch.bfloat16)
        self.runner = self.engine.sync()
        self.prompt, self.steps = prompt, steps
        self.cache = KVCache(model.config, BATCH, max_len=prompt + steps + 1, dtype=torch.bfloat16)
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, model.config.vocab_size, (BATCH, prompt), generator=generator)

    @torch.inference_mode()
    def tokens_per_second(self) -> float:
        self.cache.lengths.zero_()
        self.runner.hidden_states(self.ids, cache=self.cache)  # prefill (not timed)
        tokens = self.ids[:, -1:]
        head = self.engine.packed_head or self.runner.logits
        start = time.perf_counter()
        for _ in range(self.steps):
            hidden = self.runner.hidden_states(tokens, cache=self.cache)  # (B, 1, C)
            tokens = head(hidden[:, -1]).float().argmax(-1, keepdim=True)  # (B, 1)
        return BATCH * self.steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per repetition")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens in each row's KV cache")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"CPU: {cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    shape = preset("small", vocab_size=args.vocab)
    print(f"model: small preset (dim {shape.dim}, {shape.n_layers} layers, vocab {args.vocab}), bf16 inference copy; "
          f"batch {BATCH}, {args.prompt}-token prompts, {args.steps} decode steps x {args.reps} reps")
    base = Decoder(Transformer(shape).eval().requires_grad_(False), None, args.prompt, args.steps)
    configs = {"base": base}
    for rank in args.ranks:
        model = model_with_adapters(rank, BATCH, args.vocab)
        configs[f"rank {rank}, 1 adapter"] = Decoder(model, ["a0"] * BATCH, args.prompt, args.steps)
        model = model_with_adapters(rank, BATCH, args.vocab)
        configs[f"rank {rank}, 8 adapters"] = Decoder(model, [f"a{i}" for i in range(BATCH)], args.prompt, args.steps)
    for decoder in configs.values():
        decoder.tokens_per_second()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.reps):
        for name, decoder in configs.items():
            times[name].append(decoder.tokens_per_second())
    best_base, median_base = max(times["base"]), statistics.median(times["base"])
    print(f"{'configuration':<24}{'best tokens/s':>14}{'vs base':>9}{'median':>9}{'vs base':>9}")
    for name, values in times.items():
        best, median = max(values), statistics.median(values)
        print(f"{name:<24}{best:>14.1f}{best / best_base:>8.2f}x{median:>9.1f}{median / median_base:>8.2f}x")


if __name__ == "__main__":
    main()
