"""Direct preference optimisation: `palmchat dpo SFT_CHECKPOINT --data rankings.jsonl --out runs/dpo`.

DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) and IPO (Azar et al. 2023,
https://arxiv.org/abs/2310.12036) on chosen/rejected pairs or on K-wise rankings (all C(K,2) pairs
of a prompt in one batch element). The reference policy is the starting checkpoint; its log-probs
are computed once, before training. With LoRA the reference is simply the base with the adapter off.

`--rpo-alpha` adds the negative log-likelihood (per token) of each ranking's best response, as in RPO
(Pang et al. 2024, https://arxiv.org/abs/2404.19733; TRL's `rpo_alpha`): the DPO loss alone only moves the
margin between responses and can push the probability of the preferred ones down too.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from palmchat.data.chat import group_by_ranking, load_rankings, ranking_batch
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
from palmchat.utils.args import arg
from palmchat.utils.device import autocast_dtype, pick_device
from palmchat.world.defaults import bundled_rankings


@dataclass
class DPOArgs(TrainArgs):
    """Align a policy directly on preferences with DPO or IPO."""

    base: str = arg("", "checkpoint to start from and to use as the reference (usually the SFT model)",
                    positional=True)
    data: list[str] = arg([], "JSONL rankings or chosen/rejected pairs; default: the bundled world's rankings")
    out: str = arg("runs/dpo", "output folder")
    loss: str = arg("sigmoid", "sigmoid (DPO) or ipo", choices=["sigmoid", "ipo"])
    beta: float = arg(0.1, "strength of the KL constraint to the reference")
    label_smoothing: float = arg(0.0, "conservative DPO: assumed fraction of flipped labels")
    rpo_alpha: float = arg(1.0, "weight of the per-token NLL of each ranking's best response (RPO); 0 = plain DPO")
    epochs: float = arg(1.0, "passes over the data")
    batch_size: int = arg(16, "rankings per step")
    lr: float = arg(5e-5, "peak learning rate (2e-4 drifted far from the reference and lost to SFT on the bundled "
                          "world)")
    warmup_steps: int = arg(10, "linear warmup steps")
    max_len: int = arg(0, "tokens per prompt+response; 0 = the model's context")
    val_fraction: float = arg(0.05, "rankings held out for the preference accuracy")
    lora_rank: int = arg(0, "train a LoRA adapter instead of all weights")
    lora_alpha: float = arg(16.0, "LoRA scaling numerator")


def ranking_logps(model, tokenizer, rankings, max_len, device, dtype, mean: bool, return_tokens: bool = False):
    """(B, K_max) summed (or mean) response log-probs, column j = rank j; (B,) K per ranking; and optionally
    (B, K_max) response token counts."""
    batch = ranking_batch(tokenizer, rankings, max_len)
    logps = response_logprobs(model, batch["ids"].to(device), batch["prompt_lens"].to(device),
                              batch["lengths"].to(device), reduce="mean" if mean else "sum", dtype=dtype)
    k = batch["num_responses"].to(device)
    if not return_tokens:
        return group_by_ranking(logps, k), k
    tokens = (batch["lengths"] - batch["prompt_lens"]).to(device).float()
    return group_by_ranking(logps, k), k, group_by_ranking(tokens, k, fill=1.0)


def main(args: DPOArgs) -> Path:
    device = pick_device(args.device)
    dtype = autocast_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_policy(args.base, args.lora_rank, args.lora_alpha, device)
    max_len = args.max_len or model.config.max_seq_len
    rankings = [r for path in args.data for r in load_rankings(path)] if args.data else bundled_rankings(args.seed)
    random.Random(args.seed).shuffle(rankings)
    n_val = max(1, int(len(rankings) * args.val_fraction))
    val, train = rankings[:n_val], rankings[n_val:]
    if not train:
        raise ValueError("DPO needs at least 2 rankings")
    mean = args.loss == "ipo"  # IPO works on length-normalised log-probs

    # the reference log-probs, once: the starting weights (or the base with the adapter switched off)
    def reference(items):
        from palmchat.model.lora import use_adapter

        model.eval()
        out = []
        with torch.no_grad(), use_adapter(model, None):
            for i in range(0, len(items), 2 * args.batch_size):
                chunk = items[i:i + 2 * args.batch_size]
                logps, _ = ranking_logps(model, tokenizer, chunk, max_len, device, dtype, mean)
                out.extend(logps.float().unbind(0))
        model.train()
        return out

    ref_train, ref_val = reference(train), reference(val)
    index = list(range(len(train)))
    steps_per_epoch = max(1, len(train) // args.batch_size)
    max_steps = max(1, int(args.epochs * steps_per_epoch))
    optimizer = adamw(model, args.lr, 0.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl")
    print(f"{args.loss}: {len(train)} train / {len(val)} held-out rankings, {max_steps} steps, beta {args.beta}")

    def stack(refs):
        width = max(r.shape[0] for r in refs)
        return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[0])) for r in refs])

    def validate(step):
        model.eval()
        correct = total = 0.0
        with torch.no_grad():
            for i in range(0, len(val), 2 * args.batch_size):
                logps, k = ranking_logps(model, tokenizer, val[i:i + 2 * args.batch_size], max_len, device, dtype, mean)
                margin = logps.float() - stack(ref_val[i:i + 2 * args.batch_size]).to(device)[:, :logps.shape[1]]
                for row, kk in zip(margin.tolist(), k.tolist()):
                    pairs = [(a, b) for a in range(kk) for b in range(a + 1, kk)]
                    correct += sum(row[a] > row[b] for a, b in pairs)
                    total += len(pairs)
        model.train()
        metrics.write(step=step, val_preference_accuracy=correct / total)
        return correct / total

    validate(0)
    order = random.Random(args.seed + 1)
    started = time.time()
    for step in tqdm(range(max_steps), desc=args.loss, dynamic_ncols=True, mininterval=1.0):
        pos = step % steps_per_epoch
        if pos == 0:
            order.shuffle(index)
        chosen = index[pos * args.batch_size:(pos + 1) * args.batch_size]
        lr = cosine_lr(step, max_steps, args.warmup_steps, args.lr, args.lr * 0.1)
        logps, k, tokens = ranking_logps(model, tokenizer, [train[i] for i in chosen], max_len, device, dtype, mean,
                                         return_tokens=True)
        ref = stack([ref_train[i] for i in chosen]).to(device)[:, :logps.shape[1]]
        loss, rewards = dpo_ranking_loss(logps, ref, k, beta=args.beta, loss_type=args.loss,
                                         label_smoothing=args.label_smoothing)
        best_nll = -(logps[:, 0] if mean else logps[:, 0] / tokens[:, 0]).mean()  # per token, the top-ranked response
        if args.rpo_alpha:
            loss = loss + args.rpo_alpha * best_nll
        loss.backward()
        optimizer_step(optimizer, model.parameters(), args.grad_clip, lr)
        metrics.write(step=step + 1, loss=loss.item(), lr=lr, best_nll=best_nll.item(),
                      reward_margin=(rewards[:, 0] - rewards[:, 1]).mean().item())
    accuracy = validate(max_steps)
    plot_metrics(out / "metrics.jsonl", out / "loss.png", ["loss", "reward_margin", "val_preference_accuracy"],
                 f"{args.loss.upper()} training")
    config = {"stage": "dpo", "model": model.config.to_dict(), "train": dataclasses.asdict(args),
              "minutes": (time.time() - started) / 60, "eval": {"val_preference_accuracy": accuracy}}
    final = save_policy(out, max_steps, model, config, args.base, args.lora_rank)
    print(f"{args.loss} done: {final}  held-out preference accuracy {accuracy:.3f}")
    return final
