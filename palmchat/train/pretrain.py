"""Pretrain a PaLM-style decoder on text: `palmchat pretrain --out runs/pretrain`.

Reads text/JSONL files (default: the bundled assistant world), trains a byte-level BPE tokenizer,
writes token shards, then trains with AdamW, warmup + cosine LR, gradient accumulation and clipping,
bf16 autocast where the hardware runs it fast, the PaLM z-loss, periodic held-out loss, and atomic
checkpoints. Batches are a pure function of (seed, step), so `--resume` reproduces the losses of an
uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from palmchat import checkpoint
from palmchat.data.shards import PackedBatches, load_meta, read_documents, write_shards
from palmchat.losses import cross_entropy
from palmchat.model.config import ModelConfig, preset
from palmchat.model.transformer import Transformer
from palmchat.tokenizer.bpe import Tokenizer, train_tokenizer
from palmchat.train.common import MetricsLog, TrainArgs, adamw, cosine_lr, optimizer_step, plot_metrics
from palmchat.utils.args import arg
from palmchat.utils.device import autocast, autocast_dtype, pick_device
from palmchat.world.defaults import bundled_documents


@dataclass
class PretrainArgs(TrainArgs):
    """Pretrain a PaLM-style decoder on text or JSONL files."""

    out: str = arg("runs/pretrain", "output folder: checkpoints, tokenizer, token shards, metrics.jsonl, loss.png")
    data: list[str] = arg([], "text (.txt, blank-line separated documents) or JSONL ({'text': ...}) files or folders; "
                              "default: the bundled assistant world")
    tokenizer: str = arg("", "an existing tokenizer.json; default: train one on the data")
    vocab_size: int = arg(2048, "vocabulary size when training the tokenizer")
    preset: str = arg("mini", "model preset: tiny, mini, small or base")
    model: str = arg("", "model config overrides, e.g. 'block=sequential,n_kv_heads=2,norm=rmsnorm'")
    seq_len: int = arg(0, "training sequence length; 0 = the model's context length")
    context_steps: int = arg(0, "the last N steps train on sequences of the model's whole context length, with the "
                                "same tokens per step (fewer sequences), after --seq-len for the rest: long "
                                "positions are learnt at a fraction of the cost of training on them throughout")
    batch_size: int = arg(16, "sequences per micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    max_steps: int = arg(800, "optimizer steps")
    max_minutes: float = arg(0.0, "stop (and save) after this many minutes; 0 = no limit")
    lr: float = arg(2e-3, "peak learning rate")
    min_lr_ratio: float = arg(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = arg(50, "linear warmup steps")
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices")
    grad_clip: float = arg(1.0, "clip the gradient norm to this; 0 = off")
    z_loss: float = arg(1e-4, "PaLM z-loss weight (keeps the softmax normaliser near 1)")
    compile: bool = arg(False, "torch.compile the model: faster steps on CPU after a minute or so of compiling "
                               "(benchmarks/bench_foundation.py); worth it for runs longer than a few minutes")
    eval_every: int = arg(100, "held-out loss every this many steps")
    eval_batches: int = arg(8, "held-out batches per evaluation")
    save_every: int = arg(200, "checkpoint every this many steps")
    keep_last: int = arg(2, "checkpoints to keep")
    seed: int = arg(0, "random seed (weights, batches, data split)")
    resume: bool = arg(False, "continue from the newest checkpoint in --out")


def parse_overrides(text: str) -> dict:
    fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--model: cannot read {item!r}; expected key=value with key one of {', '.join(fields)}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def prepare_data(args: PretrainArgs, out: Path) -> tuple[Tokenizer, Path]:
    """Tokenizer + token shards in out/, reused when they already exist (resume)."""
    tok_path, shard_dir = out / "tokenizer.json", out / "data"
    if args.resume and tok_path.exists() and (shard_dir / "meta.json").exists():
        return Tokenizer.load(tok_path), shard_dir
    docs = list(read_documents(args.data)) if args.data else bundled_documents(args.seed)
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
    else:
        tokenizer = train_tokenizer(docs, vocab_size=args.vocab_size)
    tokenizer.save(tok_path)
    write_shards(docs, tokenizer, shard_dir, seed=args.seed)
    return tokenizer, shard_dir


def evaluate(model, batches: PackedBatches, n: int, device, dtype) -> float:
    model.eval()
    losses = []
    with torch.no_grad(), autocast(device, dtype):
        for x, y in batches.iter_eval_batches(n):
            losses.append(cross_entropy(model(x.to(device)), y.to(device))[0].item())
    model.train()
    return sum(losses) / max(1, len(losses))


def context_phase_batches(args: PretrainArgs, seq_len: int, context: int, shard: Path) -> PackedBatches | None:
    """Batches of whole-context sequences for the last --context-steps steps, as many tokens as a step before."""
    if not args.context_steps:
        return None
    tokens = args.batch_size * seq_len
    if seq_len >= context or tokens % context:
        raise ValueError(f"--context-steps: needs --seq-len shorter than the model's context ({context}) and "
                         f"--batch-size x --seq-len ({tokens}) a multiple of it, to keep the tokens per step")
    return PackedBatches(shard, context, tokens // context, seed=args.seed)


def main(args: PretrainArgs) -> Path:
    out = Path(args.out)
    has_checkpoint = (out / "latest").exists()
    if has_checkpoint and not args.resume:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if args.resume and not has_checkpoint:
        raise ValueError(f"--resume: no checkpoint in {out}")
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(args.device)
    dtype = autocast_dtype(args.dtype, device)
    torch.manual_seed(args.seed)

    tokenizer, shard_dir = prepare_data(args, out)
    if args.resume:
        saved = checkpoint.read_config(out)
        config = ModelConfig.from_dict(saved["model"])
        start_step = saved["step"]
    else:
        config = preset(args.preset, vocab_size=tokenizer.vocab_size, **parse_overrides(args.model))
        start_step = 0
    seq_len = args.seq_len or config.max_seq_len
    if seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's context ({config.max_seq_len})")
    train_batches = PackedBatches(shard_dir / "train.bin", seq_len, args.batch_size, seed=args.seed)
    context_batches = context_phase_batches(args, seq_len, config.max_seq_len, shard_dir / "train.bin")
    val_batches = PackedBatches(shard_dir / "val.bin", seq_len, args.batch_size, seed=args.seed)
    meta = load_meta(shard_dir)

    model = Transformer(config).to(device)
    optimizer = adamw(model, args.lr, args.weight_decay)
    if args.resume:
        checkpoint.load_weights(model, out)
        checkpoint.load_optimizer(optimizer, out)
    ckpt_config = {"stage": "pretrain", "model": config.to_dict(), "train": dataclasses.asdict(args)}
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step if args.resume else None)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters ({config.block} block, {config.n_kv_heads} kv head(s)), "
          f"precision: {'bf16 autocast' if dtype else 'fp32'}, device: {device}, "
          f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} held-out tokens")

    tokens_per_step = args.batch_size * args.grad_accum * seq_len
    # the compiled module shares the model's parameters: checkpoints and evaluation keep using `model`
    forward = torch.compile(model) if args.compile else model
    started, step = time.time(), start_step
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps, desc="pretrain",
               dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        lr = cosine_lr(step, args.max_steps, args.warmup_steps, args.lr, args.lr * args.min_lr_ratio)
        t0 = time.time()
        loss_sum = 0.0
        for micro in range(args.grad_accum):
            batches = context_batches if step >= args.max_steps - args.context_steps else train_batches
            x, y = batches.get_batch(step * args.grad_accum + micro)
            with autocast(device, dtype):
                logits = forward(x.to(device))
            loss, _ = cross_entropy(logits, y.to(device), z_loss=args.z_loss)
            (loss / args.grad_accum).backward()
            loss_sum += loss.item() / args.grad_accum
        grad_norm = optimizer_step(optimizer, model.parameters(), args.grad_clip, lr).item()
        tok_s = tokens_per_step / (time.time() - t0)
        done = step + 1
        row = dict(step=done, loss=loss_sum, lr=lr, grad_norm=grad_norm, tokens=done * tokens_per_step, tok_s=tok_s)
        last = done == args.max_steps or (args.max_minutes and time.time() - started > 60 * args.max_minutes)
        if done % args.eval_every == 0 or last:
            row["val_loss"] = evaluate(model, val_batches, args.eval_batches, device, dtype)
        metrics.write(**row)
        val = {"val": f"{row['val_loss']:.3f}"} if "val_loss" in row else {}
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tok_s:,.0f}", **val)
        if done % args.save_every == 0 or last:
            checkpoint.save_checkpoint(out, done, model, ckpt_config, out / "tokenizer.json", optimizer, args.keep_last)
        if last:
            break
    bar.close()
    plot_metrics(out / "metrics.jsonl", out / "loss.png", ["loss", "val_loss"], "pretraining loss")
    final = checkpoint.resolve(out)
    print(f"pretraining done: checkpoint {final}, metrics {out / 'metrics.jsonl'}, plot {out / 'loss.png'}")
    return final
