"""GRPO: `palmchat grpo SFT_CHECKPOINT --reward verifier --out runs/grpo`.

Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300):
no critic. Each prompt is answered G times; a response's advantage is its reward normalised within its
group, shared by all its tokens. The loss is PPO's clipped surrogate plus beta * KL(policy || reference)
with the k3 estimator, added to the loss rather than to the reward. Same reward sources as PPO.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from palmchat.inference.engine import Engine
from palmchat.losses import group_advantages, kl_penalty, masked_mean, ppo_policy_loss
from palmchat.model.lora import use_adapter
from palmchat.train.common import MetricsLog, TrainArgs, load_policy, optimizer_step, plot_metrics, save_policy
from palmchat.train.rollout import load_prompt_texts, make_scorer, rollout_logprobs, sample
from palmchat.utils.args import arg
from palmchat.utils.device import autocast_dtype, pick_device


@dataclass
class GRPOArgs(TrainArgs):
    """Align a policy with GRPO (critic-free, group-normalised advantages)."""

    base: str = arg("", "the policy to start from and the reference (usually the SFT model)", positional=True)
    reward: str = arg("verifier", "a reward-model checkpoint, or 'verifier' for the bundled world's verifier")
    prompts: list[str] = arg([], "JSONL prompts ({'prompt': ...}); default: the bundled world's training prompts")
    out: str = arg("runs/grpo", "output folder")
    iterations: int = arg(30, "rollout + update rounds")
    prompts_per_iteration: int = arg(8, "prompts per rollout batch")
    group_size: int = arg(8, "samples per prompt (G)")
    minibatch: int = arg(16, "sequences per gradient step")
    epochs: int = arg(1, "passes over each rollout batch")
    max_new_tokens: int = arg(48, "response length limit")
    temperature: float = arg(1.0, "sampling temperature of the rollouts")
    lr: float = arg(5e-5, "learning rate")
    clip: float = arg(0.2, "ratio clip epsilon")
    beta: float = arg(0.04, "KL(policy || reference) weight in the loss (k3 estimator)")
    scale_advantages: bool = arg(True, "divide by the group's std (off = Dr. GRPO mean-centering only)")
    missing_eot_penalty: float = arg(1.0, "subtracted from the score of a response that never ends")
    lora_rank: int = arg(0, "train a LoRA adapter instead of all weights (reference = adapter off)")
    lora_alpha: float = arg(16.0, "LoRA scaling numerator")
    dtype: str = arg("auto", "training precision: auto (bf16 where fast), bf16 or fp32",
                     choices=["auto", "bf16", "fp32"])


def main(args: GRPOArgs) -> Path:
    device = pick_device(args.device)
    dtype = autocast_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    policy, tokenizer, _ = load_policy(args.base, args.lora_rank, args.lora_alpha, device, adapter_name="actor")
    reference = None if args.lora_rank else copy.deepcopy(policy).eval().requires_grad_(False)
    score_fn, _ = make_scorer(args.reward, tokenizer, device, dtype, args.seed)
    prompts = load_prompt_texts(args.prompts, args.seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    engine = Engine(policy)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl")
    rng = random.Random(args.seed)
    n = args.prompts_per_iteration * args.group_size
    started = time.time()
    for it in tqdm(range(args.iterations), desc="grpo", dynamic_ncols=True):
        t0 = time.time()
        policy.eval()
        group_prompts = [p for p in (rng.choice(prompts) for _ in range(args.prompts_per_iteration))
                         for _ in range(args.group_size)]  # G consecutive copies of each prompt
        rollout = sample(engine, tokenizer, group_prompts, args.max_new_tokens, seed=args.seed * 7919 + it,
                         temperature=args.temperature)
        scores = score_fn(rollout) - args.missing_eot_penalty * (~rollout.finished).float()
        advantages = group_advantages(scores, args.group_size, scale=args.scale_advantages).to(device)
        mask = rollout.mask.to(device)
        with torch.no_grad():
            old_logp = rollout_logprobs(policy, rollout, device=device, dtype=dtype)
            with use_adapter(policy, None) if args.lora_rank else contextlib.nullcontext():
                ref_logp = rollout_logprobs(reference or policy, rollout, device=device, dtype=dtype)
        policy.train()
        stats = []
        for _ in range(args.epochs):
            order = torch.randperm(n).tolist()
            for i in range(0, n, args.minibatch):
                rows = torch.tensor(order[i:i + args.minibatch])
                m = mask[rows]
                logp = rollout_logprobs(policy, rollout, rows, device=device, dtype=dtype)
                token_adv = advantages[rows, None].expand_as(logp)
                surrogate, pstats = ppo_policy_loss(logp, old_logp[rows], token_adv, m, args.clip)
                kl = masked_mean(kl_penalty(logp, ref_logp[rows], "k3"), m)
                loss = surrogate + args.beta * kl
                loss.backward()
                optimizer_step(optimizer, params, args.grad_clip)
                stats.append([loss.item(), kl.item(), float(pstats["clipfrac"])])
        s = torch.tensor(stats).mean(0).tolist()
        metrics.write(step=it + 1, score=scores.mean().item(), loss=s[0], kl=s[1], clipfrac=s[2],
                      length=rollout.response_lens.float().mean().item(),
                      finished=rollout.finished.float().mean().item(), samples_per_s=n / (time.time() - t0))
    plot_metrics(out / "metrics.jsonl", out / "reward.png", ["score", "kl"], "GRPO: score and KL per iteration")
    config = {"stage": "grpo", "model": policy.config.to_dict(), "train": dataclasses.asdict(args),
              "minutes": (time.time() - started) / 60}
    final = save_policy(out, args.iterations, policy, config, args.base, args.lora_rank, adapter_name="actor")
    print(f"grpo done: {final}")
    return final
