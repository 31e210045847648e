"""PPO from human feedback: `palmchat ppo SFT_CHECKPOINT --reward runs/reward --out runs/ppo`.

InstructGPT-style RLHF (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155; Ziegler et al. 2019,
https://arxiv.org/abs/1909.08593) with PPO (Schulman et al. 2017, https://arxiv.org/abs/1707.06347):

    for each iteration:
        sample responses to a batch of prompts with the KV-cached engine          (rollout)
        score each response: reward model at its end-of-turn token, or a Python function
        per-token reward = -kl_coef * (log pi - log pi_ref), + score on the last token
            (the k1 estimator: the only one whose expected reward gradient is the KL's, see --kl-coef)
        advantages by GAE over the critic's values, whitened
        several epochs of minibatch updates: clipped policy loss (times the TIS weight for bf16 rollouts)
            + clipped value loss
            (+ with --ptx-coef, a language-model loss on pretraining text: PPO-ptx, InstructGPT eq. 2)
        adapt kl_coef toward a target KL (or keep it fixed)

The frozen reference is a copy of the starting policy, or with LoRA the same base with the adapter off.

The critic (`--critic`): `separate` is InstructGPT's, a second backbone initialised from the reward model
(or a copy of the policy), so every rollout and every minibatch costs a policy pass and a critic pass;
`shared` puts a linear value head on the policy's own final hidden states (as TRL's and trlx's
`...WithValueHead` models do), so one forward pass gives both the log-probs and the values and the update
costs half as much. The value loss then also trains the policy's trunk, weighted by --vf-coef.
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

from palmchat.data.shards import read_documents
from palmchat.inference.engine import Engine
from palmchat.losses import (
    cross_entropy,
    gae,
    kl_shaped_rewards,
    masked_sum,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    truncated_is_weights,
)
from palmchat.model.heads import ValueModel
from palmchat.model.lora import use_adapter
from palmchat.tokenizer.chat_format import conversation_start
from palmchat.train.common import MetricsLog, load_policy, optimizer_step, plot_metrics, save_policy
from palmchat.train.rollout import (
    RLArgs,
    check_rl_args,
    gather_actions,
    load_prompt_messages,
    make_scorer,
    maybe_save_state,
    minibatches,
    reference_logprobs,
    rollout_logprobs,
    rollout_metrics,
    sample,
    score_rollout,
    start_or_resume,
    write_samples,
)
from palmchat.utils.args import arg
from palmchat.utils.device import autocast, autocast_dtype, pick_device


@dataclass
class PPOArgs(RLArgs):
    """Align a policy with PPO against a reward model or a verifier."""

    out: str = arg("runs/ppo", "output folder")
    lr: float = arg(5e-5, "policy learning rate")
    rollout_batch: int = arg(64, "prompts sampled per iteration")
    minibatch: int = arg(16, "sequences per optimizer step")
    ppo_epochs: int = arg(2, "passes over each rollout batch")
    critic: str = arg("shared", "separate: its own backbone (from the reward model when there is one); shared: a "
                                  "value head on the policy's hidden states (one forward pass for both)",
                      choices=["separate", "shared"])
    critic_lr: float = arg(2e-4, "critic learning rate (the value head's alone with --critic shared)")
    clip: float = arg(0.2, "PPO ratio clip epsilon")
    value_clip: float = arg(0.2, "value clip epsilon")
    vf_coef: float = arg(0.5, "value loss weight")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")
    kl_coef: float = arg(0.05, "initial KL penalty coefficient. The penalty is in the reward, per token, with the "
                               "k1 estimator log pi - log pi_ref: a reward's expected gradient is then exactly the "
                               "KL's; k3 there would be biased (its gradient is grad KL(pi||ref) - grad "
                               "KL(ref||pi)), so k3 is only used as a loss term, as in GRPO")
    kl_target: float = arg(0.0, "adaptive KL control target (nats per response); 0 = fixed coefficient")
    kl_horizon: int = arg(10000, "adaptive KL control horizon (samples)")
    ptx_coef: float = arg(0.0, "PPO-ptx: weight of a language-model loss on --ptx-data added to every minibatch, so "
                               "that RL does not erode what pretraining taught (InstructGPT's alignment tax)")
    ptx_data: list[str] = arg([], "text/JSONL documents for --ptx-coef (usually the pretraining corpus)")
    ptx_batch: int = arg(4, "PPO-ptx sequences per minibatch")
    ptx_seq_len: int = arg(256, "PPO-ptx tokens per sequence")
    whiten_advantages: bool = arg(True, "normalise advantages over each rollout batch")


def pretraining_tokens(paths: list[str], tokenizer) -> torch.Tensor:
    """Every document of `paths` as [bos] + its tokens, concatenated: (N,) int64."""
    start = conversation_start(tokenizer.chat_format)
    ids = [start + doc for doc in tokenizer.encode_batch(list(read_documents(paths)))]
    return torch.tensor([t for doc in ids for t in doc], dtype=torch.long)


def ptx_batch(tokens: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator, device) -> torch.Tensor:
    """(batch, seq_len + 1) random windows of the token stream."""
    seq_len = min(seq_len, len(tokens) - 1)
    starts = torch.randint(0, len(tokens) - seq_len, (batch,), generator=generator)
    return torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()]).to(device)


class AdaptiveKLController:
    """Ziegler et al. 2019 §2.2: move the coefficient so the measured KL tracks a target."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.target > 0:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + error * n_samples / self.horizon


def main(args: PPOArgs) -> Path:
    check_rl_args(args, args.rollout_batch, args.minibatch)
    device = pick_device(args.device)
    dtype = autocast_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    policy, tokenizer, _ = load_policy(args.base, args.lora_rank, args.lora_alpha, device, adapter_name="actor",
                                       dtype=dtype)
    score_fn, reward_model = make_scorer(args.reward, tokenizer, device, dtype, args.seed)
    prompts = load_prompt_messages(args.prompts, args.seed, args, "ppo")

    if args.ptx_coef > 0 and not args.ptx_data:
        raise ValueError("--ptx-coef needs --ptx-data (text or JSONL documents, e.g. the pretraining corpus)")
    ptx_tokens = pretraining_tokens(args.ptx_data, tokenizer) if args.ptx_coef > 0 else None
    ptx_rng = torch.Generator().manual_seed(args.seed)

    shared = args.critic == "shared"
    if args.lora_rank:  # one frozen base: actor adapter, critic adapter, reference = adapters off
        from palmchat.model.lora import add_lora, mark_trainable

        if not shared:
            add_lora(policy, "critic", rank=args.lora_rank, alpha=args.lora_alpha)
        mark_trainable(policy, "actor", *(() if shared else ("critic",)))
        reference = None
    else:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if shared:  # a value head on the actor's final hidden states; starts at 0
        value_head = torch.nn.Linear(policy.config.dim, 1).to(device)
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
        critic = value_head
    elif args.lora_rank:
        critic = ValueModel(policy)
    else:
        critic = (ValueModel.from_reward_model(reward_model) if reward_model is not None
                  else ValueModel(copy.deepcopy(policy)))
    critic.to(device).train()
    policy.gradient_checkpointing = args.gradient_checkpointing
    if isinstance(critic, ValueModel):
        critic.backbone.gradient_checkpointing = args.gradient_checkpointing

    def actor_mode():
        return use_adapter(policy, "actor") if args.lora_rank else contextlib.nullcontext()

    def logprobs_and_values(rollout, rows=slice(None)):
        """(b, R) log-probs of the response tokens under the actor and (b, R) values at the same positions."""
        if shared:
            with actor_mode():
                logp, hidden = rollout_logprobs(policy, rollout, rows, device=device, dtype=dtype, return_hidden=True)
            return logp, gather_actions(value_head(hidden.float()).squeeze(-1), rollout, rows)
        with actor_mode():
            logp = rollout_logprobs(policy, rollout, rows, device=device, dtype=dtype)
        ids = rollout.ids[rows].to(device)
        with autocast(device, dtype), (use_adapter(policy, "critic") if args.lora_rank else contextlib.nullcontext()):
            values = critic(ids).float()
        return logp, gather_actions(values, rollout, rows)

    actor_params = [p for n, p in policy.named_parameters() if p.requires_grad and "critic" not in n]
    critic_params = [p for n, p in critic.named_parameters() if p.requires_grad and "actor" not in n]
    policy_opt = torch.optim.AdamW(actor_params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    critic_opt = torch.optim.AdamW(critic_params, lr=args.critic_lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    kl_ctl = AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    # with LoRA and a separate critic, the critic's trunk is the policy (its critic adapter is saved with it)
    modules = {"policy": policy, "critic": critic.head if args.lora_rank and not shared else critic}
    optimizers = {"policy": policy_opt, "critic": critic_opt}
    rngs = {"prompts": rng, "ptx": ptx_rng}
    start, state = start_or_resume(args, out, modules, optimizers, rngs)
    kl_ctl.coef = state.get("kl_coef", kl_ctl.coef)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start if args.resume else None,
                         tensorboard=args.tensorboard)
    started = time.time()
    # sample in the training precision (old log-probs are recomputed by the training forward pass, and TIS corrects
    # for the bf16 copy's own numerics); the engine rebuilds its inference copy after every optimizer step, so
    # rollouts come from the current policy
    engine = Engine(policy, dtype=dtype)
    tis_cap = args.tis_cap if dtype is not None else 0.0
    for it in tqdm(range(start, args.iterations), desc="ppo", dynamic_ncols=True, initial=start,
                   total=args.iterations):
        # ---- rollout -----------------------------------------------------------------------
        t0 = time.time()
        policy.eval()
        batch_prompts = [rng.choice(prompts) for _ in range(args.rollout_batch)]
        with actor_mode():
            rollout = sample(engine, tokenizer, batch_prompts, args.max_new_tokens, seed=args.seed * 7919 + it,
                             temperature=args.temperature, max_prompt_len=args.max_prompt_len)
        scores = score_rollout(score_fn, rollout, args.missing_eot_penalty)
        mask = rollout.mask.to(device)
        with torch.no_grad():
            old_logp, old_values = logprobs_and_values(rollout)
            ref_logp = reference_logprobs(policy, reference, rollout, device=device, dtype=dtype)
            rewards, kl = kl_shaped_rewards(scores, old_logp, ref_logp, mask, kl_ctl.coef)
            advantages, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
            raw_advantages = advantages
            if args.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
            weights = truncated_is_weights(old_logp, rollout.sample_logprobs.to(device), mask, tis_cap) \
                if tis_cap > 0 else None
        rollout_time = time.time() - t0

        # ---- PPO epochs over minibatches -------------------------------------------------------
        policy.train()
        stats, ratio_max = [], 0.0
        for _ in range(args.ppo_epochs):
            order = torch.randperm(args.rollout_batch).tolist()
            for micro_batches in minibatches(order, args.minibatch, args.grad_accum):
                step_rows = torch.cat(micro_batches)
                num_tokens = mask[step_rows].sum()
                for rows in micro_batches:
                    m = mask[rows]
                    logp, values = logprobs_and_values(rollout, rows)
                    policy_loss, pstats = ppo_policy_loss(logp, old_logp[rows], advantages[rows], m, args.clip,
                                                          num_tokens=num_tokens,
                                                          is_weights=None if weights is None else weights[rows])
                    value_loss, vclip = ppo_value_loss(values, old_values[rows], returns[rows], m, args.value_clip,
                                                       num_tokens=num_tokens)
                    loss, ptx_loss = policy_loss + args.vf_coef * value_loss, torch.zeros(())
                    if ptx_tokens is not None:
                        with actor_mode(), autocast(device, dtype):
                            windows = ptx_batch(ptx_tokens, args.ptx_batch, args.ptx_seq_len, ptx_rng, device)
                            ptx_loss, _ = cross_entropy(policy(windows[:, :-1]), windows[:, 1:])  # pretraining's
                        loss = loss + args.ptx_coef * ptx_loss * len(rows) / len(step_rows)
                    loss.backward()
                    stats.append([policy_loss.item(), value_loss.item(), float(pstats["clipfrac"]),
                                  float(pstats["approx_kl"]), ptx_loss.item(), float(vclip)])
                    ratio_max = max(ratio_max, float(pstats["ratio_max"]))
                # actor and critic parameters are disjoint: each optimizer clips and steps its own
                optimizer_step(policy_opt, actor_params, args.grad_clip)
                optimizer_step(critic_opt, critic_params, args.grad_clip)

        mean_kl = masked_sum(kl, mask, dim=1).mean().item()  # nats per response
        kl_coef = kl_ctl.coef  # the coefficient this iteration's rewards used
        kl_ctl.update(mean_kl, args.rollout_batch)
        s = torch.tensor(stats).mean(0).tolist()
        # explained variance of the critic's values on this rollout: 1 = perfect, 0 = no better than a constant
        v, r = old_values[mask], returns[mask]
        explained_variance = (1 - (r - v).var(unbiased=False) / r.var(unbiased=False).clamp_min(1e-8)).item()
        metrics.write(step=it + 1, **rollout_metrics(rollout, scores, old_logp), kl=mean_kl, kl_coef=kl_coef,
                      next_kl_coef=kl_ctl.coef,
                      advantage_mean=raw_advantages[mask].mean().item(),
                      advantage_std=raw_advantages[mask].std(unbiased=False).item(),
                      return_mean=r.mean().item(), return_std=r.std(unbiased=False).item(),
                      explained_variance=explained_variance,
                      tis_weight=1.0 if weights is None else weights[mask].mean().item(),
                      policy_loss=s[0], value_loss=s[1], clipfrac=s[2], approx_kl=s[3], ptx_loss=s[4],
                      value_clipfrac=s[5], ratio_max=ratio_max, rollout_s=rollout_time,
                      iteration_s=time.time() - t0, samples_per_s=args.rollout_batch / (time.time() - t0))
        if args.sample_every and (it + 1) % args.sample_every == 0:
            write_samples(out, it + 1, rollout, scores)
        maybe_save_state(args, out, it + 1, modules, optimizers, rngs, state={"kl_coef": kl_ctl.coef})
    plot_metrics(out / "metrics.jsonl", out / "reward.png", ["score", "kl"], "PPO: score and KL per iteration")
    config = {"stage": "ppo", "model": policy.config.to_dict(), "train": dataclasses.asdict(args),
              "minutes": (time.time() - started) / 60}
    final = save_policy(out, args.iterations, policy, config, args.base, args.lora_rank, adapter_name="actor")
    print(f"ppo done: {final}")
    return final
