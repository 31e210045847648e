"""Supervised fine-tuning: `palmchat sft BASE --data conversations.jsonl --out runs/sft`.

Conversations in the OpenAI fine-tuning format ({"messages": [{"role", "content"}, ...]}), or in any format that
holds conversations (Open-Assistant trees, ShareGPT, Alpaca, ...: palmchat/data/formats.py, detected or named with
`--format`; an Open-Assistant file is split into train and validation by tree); the loss
is on assistant tokens only (each reply and its end-of-turn token). Batches are right-padded and the
padding carries no loss. Full fine-tuning, or LoRA with `--lora-rank`.

`--grad-accum` splits a step into micro-batches whose losses are weighted by their assistant tokens, so the update
is the one of the whole batch (the loss is a mean over the step's tokens); `--gradient-checkpointing` trades
compute for activation memory; `--save-every` / `--resume` continue a killed run exactly where it was
(palmchat/train/resume.py: trainable weights, optimizer, data order, step).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from palmchat.data.chat import encode_sft, pad_right, read_stage_data, split_by_tree
from palmchat.data.formats import FormatArgs
from palmchat.losses import IGNORE_INDEX
from palmchat.model.length_chunks import map_length_chunks
from palmchat.train.common import (
    MetricsLog,
    TrainArgs,
    adamw,
    cosine_lr,
    load_policy,
    optimizer_step,
    plot_metrics,
    save_policy,
)
from palmchat.train.resume import save_state, start_or_resume
from palmchat.utils.args import arg
from palmchat.utils.device import autocast, autocast_dtype, pick_device
from palmchat.world.defaults import bundled_conversations


@dataclass
class SFTArgs(FormatArgs, TrainArgs):
    """Supervised fine-tuning on conversations (loss on assistant tokens only)."""

    base: str = arg("", "checkpoint to start from (usually the pretrained model)", positional=True)
    data: list[str] = arg([], "conversations ({'messages': [...]} JSONL or a public format: palmchat data "
                              "inspect); default: the bundled world's demonstrations")
    out: str = arg("runs/sft", "output folder")
    epochs: float = arg(2.0, "passes over the data")
    batch_size: int = arg(32, "conversations per micro-batch (an optimizer step takes --grad-accum of them)")
    grad_accum: int = arg(1, "micro-batches per optimizer step: the same update as one batch that many times bigger")
    lr: float = arg(5e-4, "peak learning rate")
    warmup_steps: int = arg(20, "linear warmup steps")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_len: int = arg(0, "truncate conversations to this many tokens; 0 = the model's context")
    val_fraction: float = arg(0.05, "conversations held out for the validation loss")
    lora_rank: int = arg(0, "train a LoRA adapter of this rank instead of all weights; 0 = full fine-tuning")
    lora_alpha: float = arg(16.0, "LoRA scaling numerator (scale = alpha / rank)")
    gradient_checkpointing: bool = arg(False, "recompute each block's activations in backward: less memory, "
                                              "about a third more compute")
    save_every: int = arg(100, "save a resumable state in OUT/resume every this many steps; 0 = never")
    resume: bool = arg(False, "continue the run in --out from its newest resumable state (same arguments)")


def batch_loss(model, examples, pad_id, device, dtype):
    """The token-mean cross-entropy of the replies in `examples` ((ids, targets) pairs), the rows run through the
    model in chunks of similar length (model/length_chunks.py)."""
    ids, lengths = pad_right([e[0] for e in examples], pad_id)
    targets, _ = pad_right([e[1] for e in examples], IGNORE_INDEX)
    ids, lengths, targets = ids.to(device), lengths.to(device), targets.to(device)

    def summed_logprobs(chunk, rows):
        return model.token_logprobs(model.hidden_states(chunk), targets[rows, :chunk.shape[1]]).sum(1)

    with autocast(device, dtype):
        total = map_length_chunks(summed_logprobs, ids, lengths).sum()
    return -total / (targets != IGNORE_INDEX).sum().clamp_min(1)


def main(args: SFTArgs) -> Path:
    device = pick_device(args.device)
    dtype = autocast_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    if args.grad_accum < 1:
        raise ValueError("--grad-accum must be >= 1")
    model, tokenizer, base_config = load_policy(args.base, args.lora_rank, args.lora_alpha, device, dtype=dtype)
    model.gradient_checkpointing = args.gradient_checkpointing
    max_len = args.max_len or model.config.max_seq_len
    data = read_stage_data(args.data, "conversations", args, "sft") if args.data else None
    conversations = data.items if data else bundled_conversations(args.seed)
    trees = data.trees if data else [None] * len(conversations)
    encoded = [(encode_sft(tokenizer, c, max_len), tree) for c, tree in zip(conversations, trees)]
    encoded = [(e, tree) for e, tree in encoded if any(t != -100 for t in e[1])]  # truncation may drop every reply
    if len(encoded) < 2:
        raise ValueError("SFT needs at least 2 conversations with an assistant reply inside --max-len")
    train, val = split_by_tree([e for e, _ in encoded], [tree for _, tree in encoded], args.val_fraction, args.seed)
    if not train:
        raise ValueError("SFT needs conversations to train on: every one is held out (an Open-Assistant file of "
                         "one tree cannot be split by tree; add --data files)")

    index = list(range(len(train)))
    step_size = args.batch_size * args.grad_accum  # conversations per optimizer step
    steps_per_epoch = max(1, len(train) // step_size)
    max_steps = max(1, int(args.epochs * steps_per_epoch))
    optimizer = adamw(model, args.lr, args.weight_decay)
    order = random.Random(args.seed + 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, state = start_or_resume(out, args.resume, {"policy": model}, {"policy": optimizer}, rngs={"order": order})
    if args.resume:
        index = state["index"]
        print(f"sft: resuming at step {start} of {max_steps}")
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start if args.resume else None,
                         tensorboard=args.tensorboard)
    print(f"sft: {len(train)} train / {len(val)} held-out conversations, {max_steps} steps of {step_size}, "
          f"{'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full fine-tuning'}")
    pad_id = tokenizer.chat_format.pad_id

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [batch_loss(model, val[i:i + args.batch_size], pad_id, device, dtype).item()
                      for i in range(0, len(val), args.batch_size)]
        model.train()
        return sum(losses) / len(losses)

    def targets(example) -> int:
        return sum(t != IGNORE_INDEX for t in example[1])

    if start == 0:
        metrics.write(step=0, val_loss=val_loss())
    started = time.time()
    for step in tqdm(range(start, max_steps), desc="sft", dynamic_ncols=True, mininterval=1.0, initial=start,
                     total=max_steps):
        epoch_pos = step % steps_per_epoch
        if epoch_pos == 0:
            order.shuffle(index)
        batch = [train[i] for i in index[epoch_pos * step_size:(epoch_pos + 1) * step_size]]
        lr = cosine_lr(step, max_steps, args.warmup_steps, args.lr, args.lr * 0.1)
        total_targets = sum(targets(e) for e in batch)
        loss_sum = 0.0
        for i in range(0, len(batch), args.batch_size):
            micro = batch[i:i + args.batch_size]
            weight = sum(targets(e) for e in micro) / total_targets  # a token mean over the whole step
            loss = batch_loss(model, micro, pad_id, device, dtype)
            (loss * weight).backward()
            loss_sum += loss.item() * weight
        grad_norm = optimizer_step(optimizer, model.parameters(), args.grad_clip, lr)
        done = step + 1
        row = dict(step=done, loss=loss_sum, lr=lr, grad_norm=grad_norm.item())
        if done % max(1, max_steps // 5) == 0 or done == max_steps:
            row["val_loss"] = val_loss()
        metrics.write(**row)
        if args.save_every and (done % args.save_every == 0 or done == max_steps):
            save_state(out, done, {"policy": model}, {"policy": optimizer}, rngs={"order": order},
                       state={"index": index})
    plot_metrics(out / "metrics.jsonl", out / "loss.png", ["loss", "val_loss"], "SFT loss (assistant tokens)")
    config = {"stage": "sft", "model": model.config.to_dict(), "train": dataclasses.asdict(args),
              "minutes": (time.time() - started) / 60}
    final = save_policy(out, max_steps, model, config, args.base, args.lora_rank)
    print(f"sft done: {final}")
    return final
