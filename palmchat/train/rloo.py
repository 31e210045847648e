"""RLOO: `palmchat rloo SFT_CHECKPOINT --reward runs/reward --out runs/rloo`.

REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
from Human Feedback in LLMs", https://arxiv.org/abs/2402.14740; the baseline of Kool et al. 2019): no critic, the
whole response is one action.

    for each iteration:
        sample k responses to each of a batch of prompts with the KV-cached engine          (rollout)
        reward of a response R_i = score_i - kl_coef * sum_t (log pi(y_t) - log pi_ref(y_t))   (k1 KL, in the reward)
        advantage A_i = R_i - mean of the other k - 1 rewards of its prompt                   (leave-one-out)
        loss = mean over responses of sum over its tokens of the clipped surrogate -min(rho_t A_i, clip(rho_t) A_i)
            (times the TIS weight for bf16 rollouts)

With one pass over each rollout (the paper's on-policy setting) every ratio is 1 and the gradient is REINFORCE's,
-A_i grad log pi(y_i | x); further minibatches and --epochs reuse the samples, and the PPO clip (--clip) keeps those
steps near the sampling policy. The rollout code is GRPO's (palmchat/train/rollout.py).
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from palmchat.inference.engine import Engine
from palmchat.losses import leave_one_out_advantages, masked_sum, ppo_policy_loss, truncated_is_weights
from palmchat.train.common import MetricsLog, load_policy, optimizer_step, plot_metrics, save_policy
from palmchat.train.rollout import (
    RLArgs,
    check_rl_args,
    load_prompt_messages,
    make_scorer,
    maybe_save_state,
    minibatches,
    reference_logprobs,
    repeat_prompts,
    rollout_logprobs,
    rollout_metrics,
    sample,
    score_rollout,
    start_or_resume,
    write_samples,
    zero_variance_groups,
)
from palmchat.utils.args import arg
from palmchat.utils.device import autocast_dtype, pick_device


@dataclass
class RLOOArgs(RLArgs):
    """Align a policy with RLOO (REINFORCE with a leave-one-out baseline, no critic)."""

    out: str = arg("runs/rloo", "output folder")
    lr: float = arg(5e-5, "learning rate")
    prompts_per_iteration: int = arg(8, "prompts per rollout batch")
    k: int = arg(4, "samples per prompt (>= 2); each one's baseline is the mean reward of the other k - 1")
    minibatch: int = arg(0, "sequences per optimizer step; 0 = all of a rollout: one on-policy step, as the paper")
    epochs: int = arg(1, "passes over each rollout batch")
    clip: float = arg(0.2, "PPO ratio clip epsilon for the steps that reuse samples; 0 = plain REINFORCE")
    kl_coef: float = arg(0.05, "weight of KL(policy || reference) in the reward, summed over the response with the "
                               "k1 estimator log pi - log pi_ref, as the paper (whose expected gradient is the KL's)")


def main(args: RLOOArgs) -> Path:
    n = args.prompts_per_iteration * args.k
    if args.k < 2:
        raise ValueError(f"--k must be >= 2 (a leave-one-out baseline needs another sample), got {args.k}")
    minibatch = args.minibatch or n
    check_rl_args(args, n, minibatch)
    device = pick_device(args.device)
    dtype = autocast_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    policy, tokenizer, _ = load_policy(args.base, args.lora_rank, args.lora_alpha, device, adapter_name="actor",
                                       dtype=dtype)
    policy.gradient_checkpointing = args.gradient_checkpointing
    reference = None if args.lora_rank else copy.deepcopy(policy).eval().requires_grad_(False)
    score_fn, _ = make_scorer(args.reward, tokenizer, device, dtype, args.seed)
    prompts = load_prompt_messages(args.prompts, args.seed, args, "rloo")
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    modules, optimizers, rngs = {"policy": policy}, {"policy": optimizer}, {"prompts": rng}
    start, _ = start_or_resume(args, out, modules, optimizers, rngs)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start if args.resume else None,
                         tensorboard=args.tensorboard)
    engine = Engine(policy, dtype=dtype)  # as GRPO: the bf16 inference copy or the fp32 model itself
    tis_cap = args.tis_cap if dtype is not None else 0.0
    started = time.time()
    for it in tqdm(range(start, args.iterations), desc="rloo", dynamic_ncols=True, initial=start,
                   total=args.iterations):
        t0 = time.time()
        policy.eval()
        group_prompts = repeat_prompts(rng, prompts, args.prompts_per_iteration, args.k)
        rollout = sample(engine, tokenizer, group_prompts, args.max_new_tokens, seed=args.seed * 7919 + it,
                         temperature=args.temperature, max_prompt_len=args.max_prompt_len)
        scores = score_rollout(score_fn, rollout, args.missing_eot_penalty)
        mask = rollout.mask.to(device)
        with torch.no_grad():
            old_logp = rollout_logprobs(policy, rollout, device=device, dtype=dtype)
            ref_logp = reference_logprobs(policy, reference, rollout, device=device, dtype=dtype)
            kl = masked_sum(old_logp - ref_logp, mask, dim=1)  # (B,) nats per response
            rewards = scores.to(device) - args.kl_coef * kl
            advantages = leave_one_out_advantages(rewards, args.k)
            weights = truncated_is_weights(old_logp, rollout.sample_logprobs.to(device), mask, tis_cap) \
                if tis_cap > 0 else None
        rollout_s = time.time() - t0

        policy.train()
        stats, ratio_max = [], 0.0
        for _ in range(args.epochs):
            for micro_batches in minibatches(torch.randperm(n).tolist(), minibatch, args.grad_accum):
                num_seqs = sum(len(rows) for rows in micro_batches)
                for rows in micro_batches:
                    logp = rollout_logprobs(policy, rollout, rows, device=device, dtype=dtype)
                    loss, pstats = ppo_policy_loss(logp, old_logp[rows], advantages[rows, None].expand_as(logp),
                                                   mask[rows], args.clip if args.clip > 0 else None,
                                                   loss_type="sequence", num_seqs=num_seqs,
                                                   is_weights=None if weights is None else weights[rows])
                    loss.backward()
                    stats.append([loss.item(), float(pstats["clipfrac"]), float(pstats["approx_kl"])])
                    ratio_max = max(ratio_max, float(pstats["ratio_max"]))
                optimizer_step(optimizer, params, args.grad_clip)

        s = torch.tensor(stats).mean(0).tolist()
        metrics.write(step=it + 1, **rollout_metrics(rollout, scores, old_logp), kl=kl.mean().item(),
                      reward_mean=rewards.mean().item(), reward_std=rewards.std(unbiased=False).item(),
                      advantage_mean=advantages.mean().item(), advantage_std=advantages.std(unbiased=False).item(),
                      zero_variance_frac=zero_variance_groups(scores, args.k).float().mean().item(),
                      tis_weight=1.0 if weights is None else weights[mask].mean().item(),
                      loss=s[0], clipfrac=s[1], approx_kl=s[2], ratio_max=ratio_max,
                      rollout_s=rollout_s, iteration_s=time.time() - t0, samples_per_s=n / (time.time() - t0))
        if args.sample_every and (it + 1) % args.sample_every == 0:
            write_samples(out, it + 1, rollout, scores)
        maybe_save_state(args, out, it + 1, modules, optimizers, rngs, state={})
    plot_metrics(out / "metrics.jsonl", out / "reward.png", ["score", "kl"], "RLOO: score and KL per iteration")
    config = {"stage": "rloo", "model": policy.config.to_dict(), "train": dataclasses.asdict(args),
              "minutes": (time.time() - started) / 60}
    final = save_policy(out, args.iterations, policy, config, args.base, args.lora_rank, adapter_name="actor")
    print(f"rloo done: {final}")
    return final
