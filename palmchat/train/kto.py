"""Kahneman-Tversky optimisation: `palmchat kto SFT_CHECKPOINT --data feedback.jsonl --out runs/kto`.

KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306; TRL's `KTOTrainer`) aligns a policy on UNPAIRED
judgments: a completion is desirable or undesirable on its own, which is exactly what the chat page's thumbs up and
down are (`palmchat feedback export --format kto` writes them). The data is TRL's unpaired preference format,
`{"prompt": str | messages, "completion": str, "label": bool}` per line; with no --data, the bundled world's
rankings give two examples each (the best response desirable, the worst undesirable).

The loss is :func:`palmchat.losses.kto_loss`: with r the completion's log-ratio to the reference (the starting
checkpoint, or the base with the LoRA adapter off), a desirable example pays 1 - sigmoid(beta (r - z)) and an
undesirable one 1 - sigmoid(beta (z - r)), where the reference point z is the batch's KL estimate from mismatched
pairs (each prompt with the next example's completion, fixed once when the data is read, as TRL builds its KL
dataset), clamped at 0 and not differentiated. z is measured once per optimizer step, so `--grad-accum` gives the
update of one big batch. Reference log-probs are computed once, before training; `--save-every` / `--resume`
continue a killed run exactly where it was.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from palmchat.data.chat import encode_response, pad_right, read_stage_data, split_by_tree, unpaired_from_rankings
from palmchat.data.formats import FormatArgs
from palmchat.losses import kto_loss
from palmchat.model.logprobs import response_logprobs
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
from palmchat.utils.device import autocast_dtype, pick_device
from palmchat.world.defaults import bundled_rankings


@dataclass
class KTOArgs(FormatArgs, TrainArgs):
    """Align a policy on unpaired desirable/undesirable completions (thumbs up/down) with KTO."""

    base: str = arg("", "checkpoint to start from and to use as the reference (usually the SFT model)",
                    positional=True)
    data: list[str] = arg([], "JSONL {'prompt', 'completion', 'label': bool} (palmchat feedback export --format "
                              "kto), or a preference format (each ranking's best reply desirable, its worst "
                              "undesirable: palmchat data inspect); default: the bundled world's rankings, read so")
    out: str = arg("runs/kto", "output folder")
    beta: float = arg(0.1, "strength of the KL constraint to the reference")
    desirable_weight: float = arg(1.0, "lambda_D, the weight of desirable examples (the paper: keep lambda_D n_D / "
                                       "(lambda_U n_U) in [1, 4/3])")
    undesirable_weight: float = arg(1.0, "lambda_U, the weight of undesirable examples")
    epochs: float = arg(1.0, "passes over the data")
    batch_size: int = arg(16, "examples per micro-batch (an optimizer step takes --grad-accum of them)")
    grad_accum: int = arg(1, "micro-batches per optimizer step: the same update as one batch that many times bigger")
    lr: float = arg(5e-5, "peak learning rate")
    warmup_steps: int = arg(10, "linear warmup steps")
    max_len: int = arg(0, "tokens per prompt+completion; 0 = the model's context")
    max_prompt_len: int = arg(0, "prompt tokens kept at most (bos and the newest); 0 = as many as leave the "
                                 "completion whole in --max-len")
    val_fraction: float = arg(0.05, "examples held out for the desirable/undesirable margin")
    eval_every: int = arg(0, "held-out margin every this many steps; 0 = at the start and the end")
    lora_rank: int = arg(0, "train a LoRA adapter instead of all weights")
    lora_alpha: float = arg(16.0, "LoRA scaling numerator")
    gradient_checkpointing: bool = arg(False, "recompute each block's activations in backward: less memory, "
                                              "about a third more compute")
    save_every: int = arg(100, "save a resumable state in OUT/resume every this many steps; 0 = never")
    resume: bool = arg(False, "continue the run in --out from its newest resumable state (same arguments)")


def encode_examples(tokenizer, examples, max_len: int, max_prompt_len: int):
    """Each example as prompt + completion + eot, and its mismatched pair (its prompt with the next example's
    completion, the last with the first's), both truncated by the one policy of palmchat/data/chat.py."""
    seqs = [encode_response(tokenizer, e.prompt_messages, e.completion, max_len, max_prompt_len) for e in examples]
    kl = [encode_response(tokenizer, e.prompt_messages, examples[(i + 1) % len(examples)].completion, max_len,
                          max_prompt_len) for i, e in enumerate(examples)]
    return seqs, kl


def completion_logps(model, seqs, pad_id: int, device, dtype) -> torch.Tensor:
    """(N,) summed log-probs of each sequence's completion (its eot included)."""
    ids, lengths = pad_right([s.ids for s in seqs], pad_id)
    prompt_lens = torch.tensor([s.prompt_len for s in seqs])
    return response_logprobs(model, ids.to(device), prompt_lens.to(device), lengths.to(device), reduce="sum",
                             dtype=dtype)


def main(args: KTOArgs) -> Path:
    device = pick_device(args.device)
    dtype = autocast_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    if args.grad_accum < 1:
        raise ValueError("--grad-accum must be >= 1")
    model, tokenizer, _ = load_policy(args.base, args.lora_rank, args.lora_alpha, device, dtype=dtype)
    model.gradient_checkpointing = args.gradient_checkpointing
    max_len = args.max_len or model.config.max_seq_len
    pad_id = tokenizer.chat_format.pad_id
    data = read_stage_data(args.data, "unpaired", args, "kto") if args.data else None
    examples = data.items if data else unpaired_from_rankings(bundled_rankings(args.seed))
    train, val = split_by_tree(examples, data.trees if data else [None] * len(examples), args.val_fraction,
                               args.seed)
    if not {e.desirable for e in train} == {True, False}:
        raise ValueError("KTO needs desirable and undesirable examples to train on (label true and false)")
    train_seqs, train_kl = encode_examples(tokenizer, train, max_len, args.max_prompt_len)
    val_seqs, val_kl = encode_examples(tokenizer, val, max_len, args.max_prompt_len)
    desirable = torch.tensor([e.desirable for e in train])
    val_desirable = torch.tensor([e.desirable for e in val])

    def logps_of(seqs):
        return completion_logps(model, seqs, pad_id, device, dtype)

    # the reference log-probs, once, before any resumed weights are loaded
    def reference(seqs):
        from palmchat.model.lora import use_adapter

        model.eval()
        with torch.no_grad(), use_adapter(model, None):
            out = torch.cat([logps_of(seqs[i:i + 2 * args.batch_size]).float().cpu()
                             for i in range(0, len(seqs), 2 * args.batch_size)])
        model.train()
        return out

    ref, ref_kl, ref_val, ref_val_kl = (reference(s) for s in (train_seqs, train_kl, val_seqs, val_kl))
    index = list(range(len(train)))
    step_size = args.batch_size * args.grad_accum
    steps_per_epoch = max(1, len(train) // step_size)
    max_steps = max(1, int(args.epochs * steps_per_epoch))
    optimizer = adamw(model, args.lr, 0.0)
    order = random.Random(args.seed + 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, state = start_or_resume(out, args.resume, {"policy": model}, {"policy": optimizer}, rngs={"order": order})
    if args.resume:
        index = state["index"]
        print(f"kto: resuming at step {start} of {max_steps}")
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start if args.resume else None,
                         tensorboard=args.tensorboard)
    n_good = int(desirable.sum())
    print(f"kto: {len(train)} train ({n_good} desirable, {len(train) - n_good} undesirable) / {len(val)} held-out "
          f"examples, {max_steps} steps of {step_size}, beta {args.beta}")

    def validate(step):
        """The held-out margin: mean implicit reward beta * r of desirable minus undesirable completions."""
        model.eval()
        with torch.no_grad():
            rewards = args.beta * (torch.cat([logps_of(val_seqs[i:i + 2 * args.batch_size]).float().cpu()
                                              for i in range(0, len(val_seqs), 2 * args.batch_size)]) - ref_val)
        model.train()
        good, bad = rewards[val_desirable], rewards[~val_desirable]
        row = {"val_reward_desirable": good.mean().item() if len(good) else None,
               "val_reward_undesirable": bad.mean().item() if len(bad) else None}
        row["val_margin"] = (row["val_reward_desirable"] - row["val_reward_undesirable"]
                             if len(good) and len(bad) else None)
        metrics.write(step=step, **row)
        return row["val_margin"]

    if start == 0:
        validate(0)
    started = time.time()
    for step in tqdm(range(start, max_steps), desc="kto", dynamic_ncols=True, mininterval=1.0, initial=start,
                     total=max_steps):
        pos = step % steps_per_epoch
        if pos == 0:
            order.shuffle(index)
        chosen = index[pos * step_size:(pos + 1) * step_size]
        lr = cosine_lr(step, max_steps, args.warmup_steps, args.lr, args.lr * 0.1)
        with torch.no_grad():  # the reference point z is not differentiated: measure it once for the whole step
            kl_policy = logps_of([train_kl[i] for i in chosen])
        kl_ref = ref_kl[chosen].to(device)
        row = dict(loss=0.0, reward_desirable=0.0, reward_undesirable=0.0)
        counts = dict(reward_desirable=0, reward_undesirable=0)
        for i in range(0, len(chosen), args.batch_size):
            micro = chosen[i:i + args.batch_size]
            loss, rewards, z = kto_loss(logps_of([train_seqs[j] for j in micro]), ref[micro].to(device),
                                        desirable[micro], kl_policy, kl_ref, beta=args.beta,
                                        desirable_weight=args.desirable_weight,
                                        undesirable_weight=args.undesirable_weight)
            (loss * len(micro) / len(chosen)).backward()  # a mean over the step's examples
            row["loss"] += loss.item() * len(micro) / len(chosen)
            good = desirable[micro].to(rewards.device)
            row["reward_desirable"] += rewards[good].sum().item()
            row["reward_undesirable"] += rewards[~good].sum().item()
            counts["reward_desirable"] += int(good.sum())
            counts["reward_undesirable"] += int((~good).sum())
        for key, n in counts.items():
            row[key] = row[key] / n if n else None
        grad_norm = optimizer_step(optimizer, model.parameters(), args.grad_clip, lr)
        done = step + 1
        metrics.write(step=done, lr=lr, kl=z.item(), grad_norm=grad_norm.item(), **row)
        if args.eval_every and done % args.eval_every == 0 and done < max_steps:
            validate(done)
        if args.save_every and (done % args.save_every == 0 or done == max_steps):
            save_state(out, done, {"policy": model}, {"policy": optimizer}, rngs={"order": order},
                       state={"index": index})
    margin = validate(max_steps)
    plot_metrics(out / "metrics.jsonl", out / "loss.png", ["loss", "kl", "val_margin"], "KTO training")
    config = {"stage": "kto", "method": "kto", "model": model.config.to_dict(), "train": dataclasses.asdict(args),
              "minutes": (time.time() - started) / 60, "eval": {"val_margin": margin}}
    final = save_policy(out, max_steps, model, config, args.base, args.lora_rank)
    shown = "n/a" if margin is None else f"{margin:.3f}"
    print(f"kto done: {final}  held-out reward margin desirable - undesirable {shown} (0 at the start)")
    return final
