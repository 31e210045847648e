"""Bring-your-own-model benchmark: palmchat against transformers (+ peft) and llama.cpp on one model, side by side.

    .venv/bin/python benchmarks/bench_byom.py [--shapes qwen2.5-0.5b llama-1b] [--family llama|qwen2] [--quick]
    pip install llama-cpp-python   # optional: adds the llama.cpp column (builds llama.cpp from source)

For each model shape (random bf16 weights made here; no download), with 2 threads on every side:
1. batch-1 prefill tokens/s and decode tokens/s: palmchat's Engine on its bf16 inference copy, transformers'
   `generate` in fp32 and in bf16, and llama.cpp (llama-cpp-python) on the model exported by
   palmchat.checkpoint.gguf_export in bf16; then with int8 weights: palmchat's Engine with `quantize="int8"`
   (a scale per row) against llama.cpp on the Q8_0 export (a scale per 32 weights); then with 4-bit weights:
   `quantize="int4"` against llama.cpp on the Q4_0 export (the same blocks);
2. LoRA SFT training tokens/s and peak memory (RSS): palmchat (add_lora + sft.batch_loss + optimizer_step) against
   transformers + peft in a plain loop, same weights, batch, sequence length, rank and optimizer.

The model is a Hugging Face folder that every side reads: `--family llama` (the default) is palmchat's sequential
model exported as LlamaForCausalLM (and as GGUF for llama.cpp); `--family qwen2` is transformers' own
Qwen2ForCausalLM with its q/k/v biases (llama.cpp runs it as its `qwen2` architecture). palmchat loads it through
palmchat.checkpoint.hf, as a user's model.

Every measurement runs in its own process (this script re-invoked with --worker), so that each side's peak RSS
is its own and no side inherits another's allocator state; the model files are written once into --workdir.
Timing: a warm-up, then the median of the timed repeats. With `--rounds N` every setting is measured N times,
the settings taking turns (one round through all of them, then the next), and each figure is the median over the
rounds: on a shared VM whose memory bandwidth drifts by tens of percent over minutes, back-to-back settings would
otherwise be compared at different bandwidths. Nothing is installed here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from palmchat.model.config import ModelConfig
from palmchat.utils import cpu

THREADS = 2
SHAPES = {
    # Qwen2.5-0.5B's shape (its q/k/v biases only with --family qwen2): ~494M parameters, tied embeddings
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
                                ffn_hidden=4864, block="sequential", norm="rmsnorm", norm_eps=1e-6,
                                rope_theta=1e6, tie_embeddings=True, max_seq_len=4096),
    # Llama 3.2 1B's shape: ~1.24B parameters, tied embeddings
    "llama-1b": ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                            ffn_hidden=8192, block="sequential", norm="rmsnorm", norm_eps=1e-5,
                            rope_theta=5e5, tie_embeddings=True, max_seq_len=4096),
}
LORA_TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fmt(x: float) -> str:
    return f"{x:.3g}"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# One model, three formats
# ---------------------------------------------------------------------------------------------


def prepare(shape: str, family: str, workdir: Path) -> Path:
    """Write the shape's model once, in bf16, as a Hugging Face folder (hf/): palmchat's side loads it the way a user's
    model is loaded (palmchat.checkpoint.hf), transformers' with from_pretrained; and, if the export maps the
    family, as model.gguf for llama.cpp. Returns the folder."""
    from palmchat.checkpoint.hf import export_hf, load_hf_model
    from palmchat.model.transformer import Transformer
    from palmchat.tokenizer.bpe import train_tokenizer

    folder = workdir / f"{family}-{shape}"
    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = SHAPES[shape]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    if family == "llama":  # palmchat's sequential model, exported as LlamaForCausalLM (no biases)
        export_hf(Transformer(config).to(torch.bfloat16), folder / "hf")
    else:  # transformers' own Qwen2ForCausalLM, q/k/v biases included
        from transformers import Qwen2Config, Qwen2ForCausalLM

        c = config
        hf = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_hidden, num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, rms_norm_eps=c.norm_eps,
            max_position_embeddings=c.max_seq_len, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=5, pad_token_id=0))
        hf.to(torch.bfloat16).save_pretrained(folder / "hf")
    model, _ = load_hf_model(folder / "hf")
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))

    # the GGUF: palmchat's tokenizer (a small one; the rest of the vocabulary are unused placeholder tokens)
    try:
        from palmchat.checkpoint.gguf_export import export_gguf

        tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 8, vocab_size=300)
        tokenizer.save(folder)
        tokenizer.save_pretrained(folder / "hf")  # a model folder comes with its tokenizer (palmchat sft reads it)
        export_gguf(model, folder, folder / "model.gguf", dtype="bf16", name=f"{family}-{shape}")
    except ValueError as e:  # a family the export does not map yet: no llama.cpp column
        (folder / "gguf_refused.txt").write_text(str(e))
    (folder / "done").write_text("")
    print(f"  wrote the {shape} model files into {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return folder


def load_palmchat(folder: Path, dtype=torch.float32):
    from palmchat.checkpoint.hf import load_hf_model

    return load_hf_model(folder / "hf", dtype=dtype)[0]


def load_hf(folder: Path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Workers: one measurement each, in their own process
# ---------------------------------------------------------------------------------------------


def prompt_ids(config: ModelConfig, n: int) -> list[int]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(6, config.vocab_size, (n,), generator=g).tolist()


def rss_peak_reset() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def decode_rates(generate, n_prompt: int, new_tokens: int, reps: int) -> dict:
    """generate(k) runs a greedy batch-1 generation of k new tokens and returns the perf_counter time at which
    each new token became available; start is taken just before the call. prefill tokens/s = prompt / time to
    the first token (median of `reps`); decode tokens/s = 1 / the median interval between consecutive tokens
    over all repeats: on a shared machine a step whose thread was descheduled is an outlier, not the rate."""
    generate(4)  # warm-up
    prefill, intervals = [], []
    for _ in range(reps):
        start = time.perf_counter()
        stamps = generate(new_tokens)
        assert len(stamps) == new_tokens, len(stamps)
        prefill.append(n_prompt / (stamps[0] - start))
        intervals += [b - a for a, b in zip(stamps, stamps[1:])]
    return {"prefill": statistics.median(prefill), "decode": 1 / statistics.median(intervals),
            "decode_mean": len(intervals) / sum(intervals)}


def worker_decode_palmchat(folder, config, args, quantize=None):
    from palmchat.inference.engine import Engine, SamplingParams

    engine = Engine(load_palmchat(folder).eval(), dtype=torch.bfloat16, quantize=quantize)
    prompt = prompt_ids(config, args.prompt)

    def generate(k):
        stamps = []
        for step in engine.stream([prompt], SamplingParams(max_new_tokens=k, temperature=0.0)):
            stamps += [time.perf_counter()] * len(step)
        return stamps

    return decode_rates(generate, args.prompt, args.new_tokens, args.reps)


class StampStreamer:
    """A transformers streamer that notes when each generated token arrives (its first put is the prompt)."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(time.perf_counter())

    def end(self):
        pass


def worker_decode_transformers(folder, config, args, dtype):
    model = load_hf(folder, dtype).eval()
    ids = torch.tensor([prompt_ids(config, args.prompt)])

    def generate(k):
        streamer = StampStreamer()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                           do_sample=False, pad_token_id=0, streamer=streamer)
        return streamer.calls[1:]

    return decode_rates(generate, args.prompt, args.new_tokens, args.reps)


def quantized_gguf(folder: Path, dtype: str) -> Path:
    """The model as a GGUF of `dtype` ("q8_0": llama.cpp's int8, "q4_0": its 4-bit, each in blocks of 32 weights
    sharing a scale), written once."""
    path = folder / f"model-{dtype}.gguf"
    if not path.is_file():
        from palmchat.checkpoint.gguf_export import export_gguf

        export_gguf(load_palmchat(folder, torch.bfloat16), folder, path, dtype=dtype, name=folder.name)
    return path


def worker_decode_llama_cpp(folder, config, args, gguf="model.gguf"):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(folder / gguf), n_ctx=args.prompt + args.new_tokens + 8, n_batch=args.prompt,
                n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    prompt = prompt_ids(config, args.prompt)
    n_vocab = llm.n_vocab()

    def next_token():  # without logits_all, llama-cpp-python keeps no scores: read the context's last row
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    def generate(k):
        llm.reset()
        llm.eval(prompt)
        tokens, stamps = [next_token()], [time.perf_counter()]
        for _ in range(k - 1):
            llm.eval([tokens[-1]])
            tokens.append(next_token())
            stamps.append(time.perf_counter())
        return stamps

    return decode_rates(generate, args.prompt, args.new_tokens, args.reps)


def sft_batch(config: ModelConfig, args) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randint(6, config.vocab_size, (args.batch, args.seq), generator=g)


def train_loop(step, args, tokens_per_step) -> dict:
    step()  # warm-up (allocations, first-touch)
    rss_peak_reset()
    times = [timed(step) for _ in range(args.steps)]
    return {"train": tokens_per_step / statistics.median(times), "rss_mb": rss_peak_mb()}


def worker_train_palmchat(folder, config, args):
    from palmchat.train.common import adamw, load_policy, optimizer_step
    from palmchat.train.sft import batch_loss
    from palmchat.utils.device import autocast_dtype

    dtype = autocast_dtype("auto", torch.device("cpu"))  # what `palmchat sft` picks on this CPU
    # as `palmchat sft HF_FOLDER --lora-rank R` loads it: under bf16 autocast the frozen base stays bf16
    model, _, _ = load_policy(str(folder / "hf"), args.rank, 2 * args.rank, dtype=dtype)
    optimizer = adamw(model, 1e-4, 0.0)
    ids = sft_batch(config, args)
    examples = [(row[:-1].tolist(), row[1:].tolist()) for row in ids]  # every token a target

    def step():
        batch_loss(model, examples, 0, torch.device("cpu"), dtype).backward()
        optimizer_step(optimizer, model.parameters(), 1.0)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train_loop(step, args, args.batch * (args.seq - 1)) | {"trainable": trainable,
                                                                  "dtype": str(dtype or "fp32")}


def worker_train_peft(folder, config, args):
    from peft import LoraConfig, get_peft_model

    from palmchat.utils.device import autocast_dtype

    model = get_peft_model(load_hf(folder, torch.float32), LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=LORA_TARGETS_HF, bias="none"))
    model.train()
    dtype = autocast_dtype("auto", torch.device("cpu"))  # the same compute dtype as palmchat's side
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    ids = sft_batch(config, args)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    trainable = sum(p.numel() for p in params)
    return train_loop(step, args, args.batch * (args.seq - 1)) | {"trainable": trainable,
                                                                  "dtype": str(dtype or "fp32")}


WORKERS = {
    "decode palmchat bf16": worker_decode_palmchat,
    "decode transformers fp32": lambda f, c, a: worker_decode_transformers(f, c, a, torch.float32),
    "decode transformers bf16": lambda f, c, a: worker_decode_transformers(f, c, a, torch.bfloat16),
    "decode llama.cpp bf16": worker_decode_llama_cpp,
    "decode palmchat int8": lambda f, c, a: worker_decode_palmchat(f, c, a, quantize="int8"),
    "decode llama.cpp q8_0": lambda f, c, a: worker_decode_llama_cpp(f, c, a, quantized_gguf(f, "q8_0").name),
    "decode palmchat int4": lambda f, c, a: worker_decode_palmchat(f, c, a, quantize="int4"),
    "decode llama.cpp q4_0": lambda f, c, a: worker_decode_llama_cpp(f, c, a, quantized_gguf(f, "q4_0").name),
    "train palmchat LoRA": worker_train_palmchat,
    "train transformers+peft LoRA": worker_train_peft,
}


def run_worker(name: str, folder: Path, args) -> dict:
    """This script again, in a child process, for one measurement; its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, "--worker", name, "--folder", str(folder)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k in ("prompt", "new_tokens", "reps", "batch", "seq", "steps", "rank")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        died = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        if "llama.cpp" in name and proc.returncode == -11 and cpu.cpu_supports("amx"):
            died += (" (llama.cpp's AMX backend, ggml-org/llama.cpp#20824: build llama-cpp-python with "
                     "CMAKE_ARGS=-DGGML_AMX_INT8=OFF)")
        return {"error": (proc.stderr.strip().splitlines() or [died])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_over_rounds(rounds: list[dict]) -> dict:
    """One setting's result: the median of each figure over its rounds (an error in any round is the result)."""
    for r in rounds:
        if "error" in r:
            return r
    return {k: statistics.median(r[k] for r in rounds) if isinstance(v, float) else v for k, v in rounds[0].items()}


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b"], choices=list(SHAPES),
                    help="model shapes to run (llama-1b adds ~10 minutes)")
    ap.add_argument("--family", default="llama", choices=["llama", "qwen2"],
                    help="llama: palmchat's model exported as LlamaForCausalLM; qwen2: transformers' Qwen2ForCausalLM")
    ap.add_argument("--quick", action="store_true", help="smoke run: the 0.5B shape, short prompt, one repeat")
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "palmchat_bench_byom"),
                    help="where the model files are written once and reused")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated in the decode measurement")
    ap.add_argument("--reps", type=int, default=2, help="timed generate calls per setting")
    ap.add_argument("--rounds", type=int, default=1, help="measure every setting this many times, the settings "
                    "taking turns; each figure is the median over the rounds")
    ap.add_argument("--batch", type=int, default=2, help="LoRA SFT: sequences per step")
    ap.add_argument("--seq", type=int, default=257, help="LoRA SFT: tokens per sequence (targets: seq - 1)")
    ap.add_argument("--steps", type=int, default=3, help="LoRA SFT: timed steps (after one warm-up)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank) on every linear layer")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)

    if args.worker:
        folder = Path(args.folder)
        config = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
        print(json.dumps(WORKERS[args.worker](folder, config, args)))
        return

    if args.quick:
        args.shapes, args.prompt, args.new_tokens, args.reps = ["qwen2.5-0.5b"], 32, 8, 1
        args.batch, args.seq, args.steps = 1, 65, 1
    start = time.perf_counter()
    try:
        import llama_cpp
        llama_version = f"llama-cpp-python {llama_cpp.__version__}"
    except ImportError:
        llama_version = "llama-cpp-python not installed: no llama.cpp column (pip install llama-cpp-python)"
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {llama_version}; "
          f"{THREADS} threads on every side")

    ratios = []
    for shape in args.shapes:
        folder = prepare(shape, args.family, Path(args.workdir))
        config = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
        print(f"\n== {shape} ({args.family}): dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads x "
              f"{config.head_dim}, {config.n_kv_heads} kv heads, ffn {config.ffn_hidden}, vocab {config.vocab_size}; "
              f"{fmt(config.num_params() / 1e6)}M parameters", flush=True)
        gguf_note = (folder / "gguf_refused.txt").read_text() if (folder / "gguf_refused.txt").is_file() else None
        runs = {name: [] for name in WORKERS}
        for turn in range(args.rounds):
            for name in WORKERS:
                if "llama.cpp" in name and (gguf_note or "not installed" in llama_version):
                    runs[name] = [{"error": gguf_note or "llama-cpp-python not installed"}]
                    continue
                runs[name].append(run_worker(name, folder, args))
                print(f"  round {turn + 1}, {name}: {runs[name][-1]}", flush=True)
        results = {name: median_over_rounds(r) for name, r in runs.items()}

        print(f"batch 1, {args.prompt}-token prompt, {args.new_tokens} new tokens (greedy), {args.reps} repeats, "
              f"{args.rounds} round(s); decode = 1 / median step (mean alongside):")
        print(f"  {'setting':<30}{'prefill tok/s':>14}{'decode tok/s':>14}{'(mean)':>8}{'decode vs palmchat':>20}")
        ours = results["decode palmchat bf16"]
        for name in [n for n in WORKERS if n.startswith("decode")]:
            r = results[name]
            if "error" in r:
                print(f"  {name[7:]:<30}  ({r['error'][:90]})")
                continue
            vs = f"{r['decode'] / ours['decode']:.2f}x" if "decode" in ours else "-"
            print(f"  {name[7:]:<30}{fmt(r['prefill']):>14}{fmt(r['decode']):>14}{fmt(r['decode_mean']):>8}{vs:>20}")
        print(f"LoRA rank {args.rank} on every linear layer, batch {args.batch} x {args.seq - 1} target tokens, "
              f"median of {args.steps} steps:")
        print(f"  {'setting':<30}{'tokens/s':>10}{'peak RSS MB':>13}{'trainable':>12}{'compute':>16}")
        for name in [n for n in WORKERS if n.startswith("train")]:
            r = results[name]
            if "error" in r:
                print(f"  {name[6:]:<30}  ({r['error'][:90]})")
                continue
            print(f"  {name[6:]:<30}{fmt(r['train']):>10}{r['rss_mb']:>13.0f}{r['trainable'] / 1e6:>11.2f}M"
                  f"{r['dtype']:>16}")

        def ratio(a, b, key, results=results):
            ra, rb = results[a], results[b]
            return f"{ra[key] / rb[key]:.2f}x" if key in ra and key in rb else "n/a"

        best_hf = max(("decode transformers fp32", "decode transformers bf16"),
                      key=lambda n: results[n].get("decode", 0))
        ratios += [
            f"{shape}: decode tokens/s palmchat / transformers best ({best_hf[7:]}): "
            f"{ratio('decode palmchat bf16', best_hf, 'decode')}; palmchat / llama.cpp: "
            f"{ratio('decode palmchat bf16', 'decode llama.cpp bf16', 'decode')}",
            f"{shape}: int8 weights: decode tokens/s palmchat int8 / transformers best ({best_hf[7:]}): "
            f"{ratio('decode palmchat int8', best_hf, 'decode')}; / llama.cpp q8_0: "
            f"{ratio('decode palmchat int8', 'decode llama.cpp q8_0', 'decode')}",
            f"{shape}: int4 weights: decode tokens/s palmchat int4 / transformers best ({best_hf[7:]}): "
            f"{ratio('decode palmchat int4', best_hf, 'decode')}; / llama.cpp q4_0: "
            f"{ratio('decode palmchat int4', 'decode llama.cpp q4_0', 'decode')}",
            f"{shape}: prefill tokens/s palmchat / transformers fp32: "
            f"{ratio('decode palmchat bf16', 'decode transformers fp32', 'prefill')}; palmchat / llama.cpp: "
            f"{ratio('decode palmchat bf16', 'decode llama.cpp bf16', 'prefill')}",
            f"{shape}: LoRA SFT tokens/s palmchat / transformers+peft: "
            f"{ratio('train palmchat LoRA', 'train transformers+peft LoRA', 'train')}; peak RSS "
            f"{ratio('train palmchat LoRA', 'train transformers+peft LoRA', 'rss_mb')}",
        ]

    print("\n" + "\n".join(ratios))
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
