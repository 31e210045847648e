"""Direct preference optimisation: `palmchat dpo SFT_CHECKPOINT --data rankings.jsonl --out runs/dpo`.

DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) and IPO (Azar et al. 2023,
https://arxiv.org/abs/2310.12036) on chosen/rejected pairs or on K-wise rankings (all C(K,2) pairs
of a prompt in one batch element). The reference policy is the starting checkpoint; its log-probs
are computed once, before training. With LoRA the reference is simply the base with the adapter off.

Plain DPO is the default. `--rpo-alpha A` (> 0) makes it RPO (Pang et al. 2024, https://arxiv.org/abs/2404.19733;
TRL's `rpo_alpha`): the loss adds A times the per-token negative log-likelihood of each ranking's best response,
because the DPO loss alone only moves the margin between responses and can push the probability of the preferred
ones down too. The checkpoint's config and the printed summary name the method: "dpo", "ipo" or "rpo".

Each ranking's prompt is truncated once, for all its responses (palmchat/data/chat.py, `--max-prompt-len`), so the
responses are compared on the same context. `--grad-accum` splits a step into micro-batches (the same update as one
big batch), `--gradient-checkpointing` trades compute for activation memory, and `--save-every` / `--resume`
continue a killed run exactly where it was (palmchat/train/resume.py).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from palmchat.data.chat import group_by_ranking, ranking_batch, read_stage_data, split_by_tree
from palmchat.data.formats import FormatArgs
from palmchat.losses import dpo_ranking_loss
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
class DPOArgs(FormatArgs, TrainArgs):
    """Align a policy directly on preferences with DPO, IPO or RPO."""

    base: str = arg("", "checkpoint to start from and to use as the reference (usually the SFT model)",
                    positional=True)
    data: list[str] = arg([], "rankings or chosen/rejected pairs (palmchat's JSONL or a public format: "
                                      "palmchat data inspect); default: the bundled world's rankings")
    out: str = arg("runs/dpo", "output folder")
    loss: str = arg("sigmoid", "sigmoid (DPO) or ipo", choices=["sigmoid", "ipo"])
    beta: float = arg(0.1, "strength of the KL constraint to the reference")
    label_smoothing: float = arg(0.0, "conservative DPO: assumed fraction of flipped labels")
    rpo_alpha: float = arg(0.0, "RPO: weight of the per-token NLL of each ranking's best response added to the "
                                "loss; 0 = plain DPO (or IPO)")
    epochs: float = arg(1.0, "passes over the data")
    batch_size: int = arg(16, "rankings per micro-batch (an optimizer step takes --grad-accum of them)")
    grad_accum: int = arg(1, "micro-batches per optimizer step: the same update as one batch that many times bigger")
    lr: float = arg(5e-5, "peak learning rate (2e-4 drifted far from the reference and lost to SFT on the bundled "
                          "world)")
    warmup_steps: int = arg(10, "linear warmup steps")
    max_len: int = arg(0, "tokens per prompt+response; 0 = the model's context")
    max_prompt_len: int = arg(0, "prompt tokens kept at most (bos and the newest), cut once per ranking; 0 = as "
                                 "many as leave the ranking's longest response whole in --max-len")
    val_fraction: float = arg(0.05, "rankings held out for the preference accuracy")
    eval_every: int = arg(0, "held-out preference accuracy every this many steps; 0 = at the start and the end")
    lora_rank: int = arg(0, "train a LoRA adapter instead of all weights")
    lora_alpha: float = arg(16.0, "LoRA scaling numerator")
    gradient_checkpointing: bool = arg(False, "recompute each block's activations in backward: less memory, "
                                              "about a third more compute")
    save_every: int = arg(100, "save a resumable state in OUT/resume every this many steps; 0 = never")
    resume: bool = arg(False, "continue the run in --out from its newest resumable state (same arguments)")


def method_name(args: DPOArgs) -> str:
    """What the arguments train, as the report names it: "dpo", "ipo", "rpo" (DPO + NLL) or "ipo+rpo"."""
    base = "dpo" if args.loss == "sigmoid" else "ipo"
    if not args.rpo_alpha:
        return base
    return "rpo" if base == "dpo" else "ipo+rpo"


def ranking_logps(model, tokenizer, rankings, max_len, device, dtype, mean: bool, return_tokens: bool = False,
                  max_prompt_len: int = 0):
    """(B, K_max) summed (or mean) response log-probs, column j = rank j; (B,) K per ranking; and optionally
    (B, K_max) response token counts."""
    batch = ranking_batch(tokenizer, rankings, max_len, max_prompt_len)
    logps = response_logprobs(model, batch["ids"].to(device), batch["prompt_lens"].to(device),
                              batch["lengths"].to(device), reduce="mean" if mean else "sum", dtype=dtype)
    k = batch["num_responses"].to(device)
    if not return_tokens:
        return group_by_ranking(logps, k), k
    tokens = (batch["lengths"] - batch["prompt_lens"]).to(device).float()
    return group_by_ranking(logps, k), k, group_by_ranking(tokens, k, fill=1.0)


def preference_accuracy(margins: torch.Tensor, num_responses: torch.Tensor) -> tuple[float, int]:
    """(correct pairs, pairs) of a (B, K_max) grid of implicit rewards, best first: a pair is correct when the
    better response has the larger reward; a tie counts as half (the policy = the reference scores 0.5, chance)."""
    correct, total = 0.0, 0
    for row, k in zip(margins.tolist(), num_responses.tolist()):
        for a in range(k):
            for b in range(a + 1, k):
                correct += 1.0 if row[a] > row[b] else 0.5 if row[a] == row[b] else 0.0
                total += 1
    return correct, total


def main(args: DPOArgs) -> Path:
    device = pick_device(args.device)
    dtype = autocast_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    if args.grad_accum < 1:
        raise ValueError("--grad-accum must be >= 1")
    model, tokenizer, _ = load_policy(args.base, args.lora_rank, args.lora_alpha, device, dtype=dtype)
    model.gradient_checkpointing = args.gradient_checkpointing
    max_len = args.max_len or model.config.max_seq_len
    data = read_stage_data(args.data, "rankings", args, "dpo") if args.data else None
    rankings = data.items if data else bundled_rankings(args.seed)
    train, val = split_by_tree(rankings, data.trees if data else [None] * len(rankings), args.val_fraction, args.seed)
    if not train:
        raise ValueError("DPO needs at least 2 rankings")
    mean = args.loss == "ipo"  # IPO works on length-normalised log-probs
    method = method_name(args)

    def logps_of(items, return_tokens=False):
        return ranking_logps(model, tokenizer, items, max_len, device, dtype, mean, return_tokens, args.max_prompt_len)

    # the reference log-probs, once, before any resumed weights are loaded: the starting weights (or the base
    # with the adapter switched off)
    def reference(items):
        from palmchat.model.lora import use_adapter

        model.eval()
        out = []
        with torch.no_grad(), use_adapter(model, None):
            for i in range(0, len(items), 2 * args.batch_size):
                logps, _ = logps_of(items[i:i + 2 * args.batch_size])
                out.extend(logps.float().unbind(0))
        model.train()
        return out

    ref_train, ref_val = reference(train), reference(val)
    index = list(range(len(train)))
    step_size = args.batch_size * args.grad_accum  # rankings per optimizer step
    steps_per_epoch = max(1, len(train) // step_size)
    max_steps = max(1, int(args.epochs * steps_per_epoch))
    optimizer = adamw(model, args.lr, 0.0)
    order = random.Random(args.seed + 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, state = start_or_resume(out, args.resume, {"policy": model}, {"policy": optimizer}, rngs={"order": order})
    if args.resume:
        index = state["index"]
        print(f"{method}: resuming at step {start} of {max_steps}")
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start if args.resume else None,
                         tensorboard=args.tensorboard)
    print(f"{method}: {len(train)} train / {len(val)} held-out rankings, {max_steps} steps of {step_size} rankings, "
          f"beta {args.beta}" + (f", rpo_alpha {args.rpo_alpha}" if args.rpo_alpha else ""))

    def stack(refs):
        width = max(r.shape[0] for r in refs)
        return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[0])) for r in refs])

    def validate(step):
        model.eval()
        correct = total = 0.0
        with torch.no_grad():
            for i in range(0, len(val), 2 * args.batch_size):
                logps, k = logps_of(val[i:i + 2 * args.batch_size])
                margin = logps.float() - stack(ref_val[i:i + 2 * args.batch_size]).to(device)[:, :logps.shape[1]]
                c, t = preference_accuracy(margin, k)
                correct, total = correct + c, total + t
        model.train()
        metrics.write(step=step, val_preference_accuracy=correct / total)
        return correct / total

    if start == 0:
        validate(0)
    started = time.time()
    for step in tqdm(range(start, max_steps), desc=method, dynamic_ncols=True, mininterval=1.0, initial=start,
                     total=max_steps):
        pos = step % steps_per_epoch
        if pos == 0:
            order.shuffle(index)
        chosen = index[pos * step_size:(pos + 1) * step_size]
        lr = cosine_lr(step, max_steps, args.warmup_steps, args.lr, args.lr * 0.1)
        row = dict(loss=0.0, best_nll=0.0, reward_margin=0.0)
        for i in range(0, len(chosen), args.batch_size):
            micro = chosen[i:i + args.batch_size]
            weight = len(micro) / len(chosen)  # the losses are means over rankings: weight to the step's mean
            logps, k, tokens = logps_of([train[j] for j in micro], return_tokens=True)
            ref = stack([ref_train[j] for j in micro]).to(device)[:, :logps.shape[1]]
            loss, rewards = dpo_ranking_loss(logps, ref, k, beta=args.beta, loss_type=args.loss,
                                             label_smoothing=args.label_smoothing)
            best_nll = -(logps[:, 0] if mean else logps[:, 0] / tokens[:, 0]).mean()  # per token, the best response
            if args.rpo_alpha:
                loss = loss + args.rpo_alpha * best_nll
            (loss * weight).backward()
            row["loss"] += loss.item() * weight
            row["best_nll"] += best_nll.item() * weight
            row["reward_margin"] += (rewards[:, 0] - rewards[:, 1]).mean().item() * weight
        grad_norm = optimizer_step(optimizer, model.parameters(), args.grad_clip, lr)
        done = step + 1
        metrics.write(step=done, lr=lr, grad_norm=grad_norm.item(), **row)
        if args.eval_every and done % args.eval_every == 0 and done < max_steps:
            validate(done)
        if args.save_every and (done % args.save_every == 0 or done == max_steps):
            save_state(out, done, {"policy": model}, {"policy": optimizer}, rngs={"order": order},
                       state={"index": index})
    accuracy = validate(max_steps)
    plot_metrics(out / "metrics.jsonl", out / "loss.png", ["loss", "reward_margin", "val_preference_accuracy"],
                 f"{method.upper()} training")
    config = {"stage": "dpo", "method": method, "model": model.config.to_dict(), "train": dataclasses.asdict(args),
              "minutes": (time.time() - started) / 60, "eval": {"val_preference_accuracy": accuracy}}
    final = save_policy(out, max_steps, model, config, args.base, args.lora_rank)
    print(f"{method} done: {final}  held-out preference accuracy {accuracy:.3f} (0.5 = chance)")
    return final
