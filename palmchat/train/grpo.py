"""GRPO: `palmchat grpo SFT_CHECKPOINT --reward verifier --out runs/grpo`.

Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300): no critic.

    for each iteration:
        sample G responses to each of a batch of prompts with the KV-cached engine        (rollout)
        score each response: the verifier or a reward model
        advantage of a response = its score minus its group's mean (divided by the group's std, but for dr_grpo),
            shared by all its tokens; groups whose G scores are all equal have no signal (logged; with
            --filter-zero-variance dropped from the update, DAPO's dynamic sampling)
        epochs of minibatch updates: PPO's clipped surrogate (times the TIS weight for bf16 rollouts)
            + beta * KL(policy || reference) with the k3 estimator, in the loss rather than the reward,
            reduced over tokens and responses as --loss-type says

--loss-type names the reduction exactly as each paper defines it (palmchat.losses.aggregate_token_loss):
grpo = mean over each response's tokens, then over responses (DeepSeekMath eq. 3); dapo = one mean over every token
of the batch (DAPO, Yu et al. 2025); dr_grpo = sum over tokens / (responses x --max-new-tokens), with advantages only
mean-centred (Dr. GRPO, Liu et al. 2025).
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
from palmchat.losses import (
    aggregate_token_loss,
    group_advantages,
    kl_penalty,
    masked_sum,
    ppo_policy_loss,
    truncated_is_weights,
)
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
class GRPOArgs(RLArgs):
    """Align a policy with GRPO (critic-free, group-normalised advantages)."""

    out: str = arg("runs/grpo", "output folder")
    lr: float = arg(5e-5, "learning rate")
    prompts_per_iteration: int = arg(8, "prompts per rollout batch")
    group_size: int = arg(8, "samples per prompt (G)")
    minibatch: int = arg(16, "sequences per optimizer step")
    epochs: int = arg(1, "passes over each rollout batch")
    clip: float = arg(0.2, "ratio clip epsilon")
    beta: float = arg(0.04, "KL(policy || reference) weight in the loss (k3 estimator)")
    loss_type: str = arg("dapo", "how the per-token loss is averaged. dapo (default, TRL's too): one mean over every "
                                 "token of the batch, so each token weighs the same whatever its response's length "
                                 "and the step does not scale with --max-new-tokens; grpo: DeepSeekMath's mean per "
                                 "response then over responses (a long response's tokens weigh less: a length "
                                 "bias); dr_grpo: sum / (responses x --max-new-tokens) with advantages not divided "
                                 "by the group's std (Dr. GRPO, no length or difficulty bias)",
                         choices=["grpo", "dapo", "dr_grpo"])
    filter_zero_variance: bool = arg(False, "drop the groups whose G scores are all equal from the update (DAPO's "
                                            "dynamic sampling, without resampling): they carry no advantage and "
                                            "only dilute the loss's normaliser")


def main(args: GRPOArgs) -> Path:
    n = args.prompts_per_iteration * args.group_size
    check_rl_args(args, n, args.minibatch)
    device = pick_device(args.device)
    dtype = autocast_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    policy, tokenizer, _ = load_policy(args.base, args.lora_rank, args.lora_alpha, device, adapter_name="actor",
                                       dtype=dtype)
    policy.gradient_checkpointing = args.gradient_checkpointing
    reference = None if args.lora_rank else copy.deepcopy(policy).eval().requires_grad_(False)
    score_fn, _ = make_scorer(args.reward, tokenizer, device, dtype, args.seed)
    prompts = load_prompt_messages(args.prompts, args.seed, args, "grpo")
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    modules, optimizers, rngs = {"policy": policy}, {"policy": optimizer}, {"prompts": rng}
    start, _ = start_or_resume(args, out, modules, optimizers, rngs)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start if args.resume else None,
                         tensorboard=args.tensorboard)
    # rollouts in the training precision: the bf16 inference copy (rebuilt after every optimizer step), or the fp32
    # model itself; bf16 rollouts differ from the training forward, which TIS corrects
    engine = Engine(policy, dtype=dtype)
    tis_cap = args.tis_cap if dtype is not None else 0.0
    started = time.time()
    for it in tqdm(range(start, args.iterations), desc="grpo", dynamic_ncols=True, initial=start,
                   total=args.iterations):
        t0 = time.time()
        policy.eval()
        group_prompts = repeat_prompts(rng, prompts, args.prompts_per_iteration, args.group_size)
        rollout = sample(engine, tokenizer, group_prompts, args.max_new_tokens, seed=args.seed * 7919 + it,
                         temperature=args.temperature, max_prompt_len=args.max_prompt_len)
        scores = score_rollout(score_fn, rollout, args.missing_eot_penalty)
        advantages = group_advantages(scores, args.group_size, scale=args.loss_type != "dr_grpo").to(device)
        flat = zero_variance_groups(scores, args.group_size)
        mask = rollout.mask.to(device)
        with torch.no_grad():
            old_logp = rollout_logprobs(policy, rollout, device=device, dtype=dtype)
            ref_logp = reference_logprobs(policy, reference, rollout, device=device, dtype=dtype)
            weights = truncated_is_weights(old_logp, rollout.sample_logprobs.to(device), mask, tis_cap) \
                if tis_cap > 0 else None
        rollout_s = time.time() - t0

        keep = [row for row in range(n) if not (args.filter_zero_variance and flat[row // args.group_size])]
        policy.train()
        stats, ratio_max = [], float("nan") if not keep else 0.0
        for _ in range(args.epochs):
            order = [keep[i] for i in torch.randperm(len(keep)).tolist()]
            for micro_batches in minibatches(order, args.minibatch, args.grad_accum):
                step_rows = torch.cat(micro_batches)
                num_seqs, num_tokens = len(step_rows), mask[step_rows].sum()
                for rows in micro_batches:
                    m = mask[rows]
                    logp = rollout_logprobs(policy, rollout, rows, device=device, dtype=dtype)
                    token_adv = advantages[rows, None].expand_as(logp)
                    reduce = dict(loss_type=args.loss_type, max_len=args.max_new_tokens, num_seqs=num_seqs,
                                  num_tokens=num_tokens)
                    surrogate, pstats = ppo_policy_loss(logp, old_logp[rows], token_adv, m, args.clip,
                                                        is_weights=None if weights is None else weights[rows],
                                                        **reduce)
                    kl = aggregate_token_loss(kl_penalty(logp, ref_logp[rows], "k3"), m, **reduce)
                    loss = surrogate + args.beta * kl
                    loss.backward()
                    stats.append([loss.item(), kl.item(), float(pstats["clipfrac"]), float(pstats["approx_kl"])])
                    ratio_max = max(ratio_max, float(pstats["ratio_max"]))
                optimizer_step(optimizer, params, args.grad_clip)

        s = torch.tensor(stats).mean(0).tolist() if stats else [float("nan")] * 4
        per_response_kl = masked_sum(old_logp - ref_logp, mask, dim=1)
        metrics.write(step=it + 1, **rollout_metrics(rollout, scores, old_logp),
                      kl=per_response_kl.mean().item(), advantage_mean=advantages.mean().item(),
                      advantage_std=advantages.std(unbiased=False).item(),
                      zero_variance_frac=flat.float().mean().item(), rows_trained=len(keep),
                      tis_weight=1.0 if weights is None else weights[mask].mean().item(),
                      loss=s[0], kl_loss=s[1], clipfrac=s[2], approx_kl=s[3], ratio_max=ratio_max,
                      rollout_s=rollout_s, iteration_s=time.time() - t0, samples_per_s=n / (time.time() - t0))
        if args.sample_every and (it + 1) % args.sample_every == 0:
            write_samples(out, it + 1, rollout, scores)
        maybe_save_state(args, out, it + 1, modules, optimizers, rngs, state={})
    plot_metrics(out / "metrics.jsonl", out / "reward.png", ["score", "kl"], "GRPO: score and KL per iteration")
    config = {"stage": "grpo", "model": policy.config.to_dict(), "train": dataclasses.asdict(args),
              "minutes": (time.time() - started) / 60}
    final = save_policy(out, args.iterations, policy, config, args.base, args.lora_rank, adapter_name="actor")
    print(f"grpo done: {final}")
    return final
