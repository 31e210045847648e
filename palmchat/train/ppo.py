"""PPO from human feedback: `palmchat ppo SFT_CHECKPOINT --reward runs/reward --out runs/ppo`.

InstructGPT-style RLHF (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155; Ziegler et al. 2019,
https://arxiv.org/abs/1909.08593) with PPO (Schulman et al. 2017, https://arxiv.org/abs/1707.06347):

    for each iteration:
        sample responses to a batch of prompts with the KV-cached engine          (rollout)
        score each response: reward model at its end-of-turn token, or a Python function
        per-token reward = -kl_coef * KL_t(policy || reference), + score on the last token
        advantages by GAE over the critic's values, whitened
        several epochs of minibatch updates: clipped policy loss + clipped value loss
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
from palmchat.losses import cross_entropy, gae, kl_penalty, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss
from palmchat.model.heads import ValueModel
from palmchat.model.lora import use_adapter
from palmchat.train.common import MetricsLog, TrainArgs, load_policy, optimizer_step, plot_metrics, save_policy
from palmchat.train.rollout import gather_actions, load_prompt_texts, make_scorer, rollout_logprobs, sample
from palmchat.utils.args import arg
from palmchat.utils.device import autocast, autocast_dtype, pick_device


@dataclass
class PPOArgs(TrainArgs):
    """Align a policy with PPO against a reward model or a verifier."""

    base: str = arg("", "the policy to start from and the reference (usually the SFT model)", positional=True)
    reward: str = arg("verifier", "a reward-model checkpoint, or 'verifier' for the bundled world's verifier")
    prompts: list[str] = arg([], "JSONL prompts ({'prompt': ...}); default: the bundled world's training prompts")
    out: str = arg("runs/ppo", "output folder")
    iterations: int = arg(30, "rollout + update rounds")
    rollout_batch: int = arg(64, "prompts sampled per iteration")
    minibatch: int = arg(16, "sequences per gradient step")
    ppo_epochs: int = arg(2, "passes over each rollout batch")
    max_new_tokens: int = arg(48, "response length limit")
    temperature: float = arg(1.0, "sampling temperature of the rollouts")
    lr: float = arg(5e-5, "policy learning rate")
    critic: str = arg("shared", "separate: its own backbone (from the reward model when there is one); shared: a "
                                  "value head on the policy's hidden states (one forward pass for both)",
                      choices=["separate", "shared"])
    critic_lr: float = arg(2e-4, "critic learning rate (the value head's alone with --critic shared)")
    clip: float = arg(0.2, "PPO ratio clip epsilon")
    value_clip: float = arg(0.2, "value clip epsilon")
    vf_coef: float = arg(0.5, "value loss weight")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")
    kl_coef: float = arg(0.05, "initial KL penalty coefficient")
    kl_target: float = arg(0.0, "adaptive KL control target (nats per response); 0 = fixed coefficient")
    kl_horizon: int = arg(10000, "adaptive KL control horizon (samples)")
    kl_estimator: str = arg("k1", "per-token KL estimator in the reward: k1 or k3", choices=["k1", "k3"])
    missing_eot_penalty: float = arg(1.0, "subtracted from the score of a response that never ends")
    ptx_coef: float = arg(0.0, "PPO-ptx: weight of a language-model loss on --ptx-data added to every minibatch, so "
                               "that RL does not erode what pretraining taught (InstructGPT's alignment tax)")
    ptx_data: list[str] = arg([], "text/JSONL documents for --ptx-coef (usually the pretraining corpus)")
    ptx_batch: int = arg(4, "PPO-ptx sequences per minibatch")
    ptx_seq_len: int = arg(256, "PPO-ptx tokens per sequence")
    whiten_advantages: bool = arg(True, "normalise advantages over each rollout batch")
    lora_rank: int = arg(0, "train LoRA adapters (actor and critic on one shared base) instead of all weights")
    lora_alpha: float = arg(16.0, "LoRA scaling numerator")
    dtype: str = arg("auto", "training precision: auto (bf16 where fast), bf16 or fp32",
                     choices=["auto", "bf16", "fp32"])


def pretraining_tokens(paths: list[str], tokenizer) -> torch.Tensor:
    """Every document of `paths` as [bos] + its tokens, concatenated: (N,) int64."""
    ids = [[tokenizer.chat_format.bos_id] + doc for doc in tokenizer.encode_batch(list(read_documents(paths)))]
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
    device = pick_device(args.device)
    dtype = autocast_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    policy, tokenizer, _ = load_policy(args.base, args.lora_rank, args.lora_alpha, device, adapter_name="actor")
    score_fn, reward_model = make_scorer(args.reward, tokenizer, device, dtype, args.seed)
    prompts = load_prompt_texts(args.prompts, args.seed)

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
    metrics = MetricsLog(out / "metrics.jsonl")
    rng = random.Random(args.seed)
    started = time.time()
    # sample in the training precision (old log-probs are recomputed by the training forward pass anyway); the
    # engine rebuilds its inference copy after every optimizer step, so rollouts come from the current policy
    engine = Engine(policy, dtype=dtype)
    for it in tqdm(range(args.iterations), desc="ppo", dynamic_ncols=True):
        # ---- rollout -----------------------------------------------------------------------
        t0 = time.time()
        policy.eval()
        batch_prompts = [rng.choice(prompts) for _ in range(args.rollout_batch)]
        with actor_mode():
            rollout = sample(engine, tokenizer, batch_prompts, args.max_new_tokens, seed=args.seed * 7919 + it,
                             temperature=args.temperature)
        scores = score_fn(rollout) - args.missing_eot_penalty * (~rollout.finished).float()
        mask = rollout.mask.to(device)
        with torch.no_grad():
            old_logp, old_values = logprobs_and_values(rollout)
            if args.lora_rank:
                with use_adapter(policy, None):
                    ref_logp = rollout_logprobs(policy, rollout, device=device, dtype=dtype)
            else:
                ref_logp = rollout_logprobs(reference, rollout, device=device, dtype=dtype)
            kl = kl_penalty(old_logp, ref_logp, args.kl_estimator)  # (B, R)
            rewards = torch.where(mask, -kl_ctl.coef * kl, torch.zeros((), device=device))
            last = (rollout.response_lens - 1).clamp(min=0).to(device)
            rewards[torch.arange(len(last), device=device), last] += scores.to(device)
            advantages, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
            if args.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
        rollout_time = time.time() - t0
        sample_mismatch = (old_logp.cpu() - rollout.sample_logprobs[:, : old_logp.shape[1]]).abs()[rollout.mask].max()

        # ---- PPO epochs over minibatches -------------------------------------------------------
        policy.train()
        stats = []
        for _ in range(args.ppo_epochs):
            order = torch.randperm(args.rollout_batch).tolist()
            for i in range(0, args.rollout_batch, args.minibatch):
                rows = torch.tensor(order[i:i + args.minibatch])
                m = mask[rows]
                logp, values = logprobs_and_values(rollout, rows)
                policy_loss, pstats = ppo_policy_loss(logp, old_logp[rows], advantages[rows], m, args.clip)
                value_loss, vclip = ppo_value_loss(values, old_values[rows], returns[rows], m, args.value_clip)
                loss, ptx_loss = policy_loss + args.vf_coef * value_loss, torch.zeros(())
                if ptx_tokens is not None:
                    with actor_mode(), autocast(device, dtype):
                        windows = ptx_batch(ptx_tokens, args.ptx_batch, args.ptx_seq_len, ptx_rng, device)
                        ptx_loss, _ = cross_entropy(policy(windows[:, :-1]), windows[:, 1:])  # pretraining's loss
                    loss = loss + args.ptx_coef * ptx_loss
                loss.backward()  # actor and critic parameters are disjoint: each optimizer clips and steps its own
                optimizer_step(policy_opt, actor_params, args.grad_clip)
                optimizer_step(critic_opt, critic_params, args.grad_clip)
                stats.append([policy_loss.item(), value_loss.item(), float(pstats["clipfrac"]),
                              float(pstats["approx_kl"]), ptx_loss.item()])

        mean_kl = masked_mean(kl, mask).item() * mask.sum(1).float().mean().item()  # nats per response
        kl_ctl.update(mean_kl, args.rollout_batch)
        s = torch.tensor(stats).mean(0).tolist()
        metrics.write(step=it + 1, score=scores.mean().item(), kl=mean_kl, kl_coef=kl_ctl.coef,
                      length=rollout.response_lens.float().mean().item(),
                      finished=rollout.finished.float().mean().item(),
                      policy_loss=s[0], value_loss=s[1], clipfrac=s[2], approx_kl=s[3], ptx_loss=s[4],
                      logprob_mismatch=float(sample_mismatch), rollout_s=rollout_time, iteration_s=time.time() - t0,
                      samples_per_s=args.rollout_batch / (time.time() - t0))
    plot_metrics(out / "metrics.jsonl", out / "reward.png", ["score", "kl"], "PPO: score and KL per iteration")
    config = {"stage": "ppo", "model": policy.config.to_dict(), "train": dataclasses.asdict(args),
              "minutes": (time.time() - started) / 60}
    final = save_policy(out, args.iterations, policy, config, args.base, args.lora_rank, adapter_name="actor")
    print(f"ppo done: {final}")
    return final
