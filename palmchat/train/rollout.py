"""What the online-RL stages (PPO, GRPO, RLOO) share: their common arguments, sampling responses with the engine,
scoring them, the per-token log-probs of those responses under a model laid out response-aligned as (B, R)
(:func:`palmchat.model.logprobs.response_logprobs` applied to a :class:`Rollout`), the reference's log-probs,
the rollout's metrics and sample table, micro-batching and resuming.

The traps handled here, each tested (tests/test_rollout.py, tests/test_alignment.py, tests/test_reward_scoring.py):
- a prompt is a whole conversation (system prompt and earlier turns included), rendered once to token ids and never
  re-tokenised; the reward model scores those ids and the verifier gets the message list; responses keep the
  sampled ids;
- the log-probs recomputed by a training forward pass are those of the distribution the engine sampled from:
  logits / temperature, for the old, new and reference log-probs alike (as TRL and OpenRLHF do);
- a prompt longer than --max-prompt-len loses its oldest tokens after bos (the reward model's truncation policy,
  palmchat.data.chat.scoring_sequence), so every response has room for at least --max-new-tokens tokens and is
  never empty; an empty response is an error naming the prompt, never a silently dropped score;
- the reward is read at the response's own end-of-turn token (right-padded batch, index = length - 1);
- a response that never ends gets its eot appended for scoring plus a penalty, rather than being scored at a pad.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from palmchat.data.chat import pad_right
from palmchat.data.formats import FormatArgs
from palmchat.inference.engine import Engine, SamplingParams
from palmchat.inference.reward_scoring import score_responses
from palmchat.losses import masked_mean
from palmchat.model.logprobs import response_logprobs, response_positions
from palmchat.model.lora import use_adapter
from palmchat.train import resume
from palmchat.train.common import TrainArgs
from palmchat.utils.args import arg
from palmchat.utils.jsonl import jsonl_text, read_jsonl, write_jsonl
from palmchat.world.defaults import bundled_prompts

Messages = list[dict]  # [{"role": ..., "content": ...}, ...] ending with a user turn


@dataclass
class RLArgs(FormatArgs, TrainArgs):
    """The arguments PPO, GRPO and RLOO all take (beside TrainArgs'). Each stage's dataclass subclasses it."""

    base: str = arg("", "the policy to start from and the reference (usually the SFT model)", positional=True)
    reward: str = arg("verifier", "a reward-model checkpoint, or 'verifier' for the bundled world's verifier")
    prompts: list[str] = arg([], "prompts ({'prompt': str} or {'messages': [...]}, the whole conversation is the "
                                 "prompt), or any public format's prompts (palmchat data inspect); default: the "
                                 "bundled world's training prompts")
    iterations: int = arg(30, "rollout + update rounds")
    max_new_tokens: int = arg(48, "response length limit")
    max_prompt_len: int = arg(0, "prompt tokens kept at most: a longer prompt loses its oldest tokens after bos "
                                 "(the reward model's truncation), so every response has room for "
                                 "--max-new-tokens; 0 = the model's context minus --max-new-tokens")
    temperature: float = arg(1.0, "sampling temperature (> 0); every log-prob (old, new, reference) is of "
                                  "logits / temperature, the distribution the rollouts come from")
    tis_cap: float = arg(2.0, "truncated importance sampling: weight each token's policy-gradient loss by "
                              "min(exp(logp_train - logp_rollout), cap), correcting for rollouts sampled by the bf16 "
                              "inference copy; applied only when rollouts are sampled in bf16 (in fp32 the weights "
                              "are 1); 0 = off")
    missing_eot_penalty: float = arg(1.0, "subtracted from the score of a response that never ends")
    grad_accum: int = arg(1, "micro-batches per optimizer step: --minibatch sequences are split in this many "
                             "forward/backward passes, the loss scaled so the step equals one big batch's")
    gradient_checkpointing: bool = arg(False, "recompute each block's activations in backward (less memory, "
                                              "about a third more compute)")
    lora_rank: int = arg(0, "train LoRA adapters instead of all weights (the reference = adapters off)")
    lora_alpha: float = arg(16.0, "LoRA scaling numerator")
    resume: bool = arg(False, "continue from OUT/resume (the newest state --save-every wrote); the run then "
                              "equals an uninterrupted one")
    save_every: int = arg(10, "write a resumable state (weights, optimizers, RNGs, KL controller) every N "
                              "iterations; 0 = never")
    sample_every: int = arg(10, "append a table of sample rollouts (prompt, response, score) to OUT/samples.jsonl "
                                "every N iterations; 0 = never")
    dtype: str = arg("auto", "training precision: auto (bf16 where fast), bf16 or fp32; rollouts are sampled in "
                             "the same precision", choices=["auto", "bf16", "fp32"])


def check_rl_args(args: RLArgs, batch: int, minibatch: int) -> None:
    """A clear error for settings that cannot run."""
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0 for RL (got {args.temperature}): a greedy rollout has no "
                         "sampling distribution to take a policy gradient of")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.grad_accum < 1 or minibatch % args.grad_accum:
        raise ValueError(f"--minibatch {minibatch} must split into --grad-accum {args.grad_accum} equal "
                         "micro-batches")
    if minibatch < 1 or minibatch > batch:
        raise ValueError(f"--minibatch must be in [1, {batch}] (the sequences of one rollout), got {minibatch}")


# ------------------------------------------------------------------------------------------------------------------
# Prompts and sampling
# ------------------------------------------------------------------------------------------------------------------


def as_messages(prompt: str | Sequence[dict]) -> Messages:
    """A prompt as a message list: a string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def load_prompt_messages(paths: list[str], seed: int, options: FormatArgs | None = None,
                         stage: str = "rl") -> list[Messages]:
    """Prompts as whole conversations (message lists ending with a user turn) from files of any format
    ({'prompt': str} or {'messages': [...]}, or every prompt of a public data set, read with ``options``), or the
    bundled world's."""
    if not paths:
        return [as_messages(p) for p in bundled_prompts(seed)]
    from palmchat.data.chat import read_stage_data

    return read_stage_data(paths, "prompts", options or FormatArgs(), stage).items


def prompt_limit(context: int, max_new_tokens: int, max_prompt_len: int = 0) -> int:
    """Prompt tokens kept at most, so that prompt + max_new_tokens fit the context (ValueError if they cannot)."""
    limit = max_prompt_len or context - max_new_tokens
    if limit < 2:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} tokens")
    if limit + max_new_tokens > context:
        raise ValueError(f"--max-prompt-len {limit} + --max-new-tokens {max_new_tokens} = {limit + max_new_tokens} "
                         f"tokens is longer than the model's context of {context} tokens")
    return limit


def truncate_prompt(ids: list[int], limit: int) -> list[int]:
    """Keep bos and the newest limit - 1 tokens (the generation prompt is last, so it is always kept)."""
    return ids if len(ids) <= limit else ids[:1] + ids[len(ids) - (limit - 1):]


@dataclass
class Rollout:
    ids: torch.Tensor  # (B, T) prompt + response, right-padded
    prompt_lens: torch.Tensor  # (B,)
    response_lens: torch.Tensor  # (B,) response tokens (>= 1), eot included when finished
    finished: torch.Tensor  # (B,) bool: the response ended with eot
    sample_logprobs: torch.Tensor  # (B, R) log-probs the engine sampled with, 0 past each response
    prompts: list[Messages]  # the conversations, for verifiers and the samples table
    responses: list[str]  # decoded response text
    temperature: float = 1.0  # every log-prob of this rollout is of logits / temperature
    prompts_truncated: int = 0  # prompts that lost their oldest tokens to --max-prompt-len

    @property
    def mask(self) -> torch.Tensor:  # (B, R) True on response tokens
        R = self.sample_logprobs.shape[1]
        return torch.arange(R)[None, :] < self.response_lens[:, None]

    @property
    def action_index(self) -> torch.Tensor:
        """(B, R): the position whose logits predict each response token (one before it), clamped in range."""
        return response_positions(self.prompt_lens, self.sample_logprobs.shape[1], self.ids.shape[1])


def sample(engine: Engine, tokenizer, prompts: Sequence[str | Sequence[dict]], max_new_tokens: int, seed: int,
           temperature: float = 1.0, max_prompt_len: int = 0) -> Rollout:
    """One batched, KV-cached generation per prompt (repeat prompts for groups). Each prompt is a conversation
    (a string is one user turn), rendered whole; a prompt of more than `max_prompt_len` tokens (0: the context minus
    `max_new_tokens`) loses its oldest tokens after bos."""
    chat_format = tokenizer.chat_format
    conversations = [as_messages(p) for p in prompts]
    limit = prompt_limit(engine.config.max_seq_len, max_new_tokens, max_prompt_len)
    rendered = [chat_format.render_prompt(m) for m in conversations]
    prompt_ids = [truncate_prompt(p, limit) for p in rendered]
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed * 100_003 + i,
                             stop_token_ids=(chat_format.eot_id,)) for i in range(len(prompts))]
    completions = engine.generate(prompt_ids, params)
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        if not c.tokens:  # cannot happen with the limit above; never let a score go silently missing
            raise ValueError(f"prompt {i} ({len(rendered[i])} tokens, {len(p)} kept) got an empty response "
                             f"(max_new_tokens {max_new_tokens}, context {engine.config.max_seq_len})")
    ids, _ = pad_right([p + c.tokens for p, c in zip(prompt_ids, completions)], chat_format.pad_id)
    R = max(len(c.tokens) for c in completions)
    logprobs = torch.zeros(len(completions), R)
    for row, c in enumerate(completions):
        logprobs[row, : len(c.logprobs)] = torch.tensor(c.logprobs)
    return Rollout(
        ids=ids,
        prompt_lens=torch.tensor([len(p) for p in prompt_ids]),
        response_lens=torch.tensor([len(c.tokens) for c in completions]),
        finished=torch.tensor([c.finish_reason == "stop" for c in completions]),
        sample_logprobs=logprobs,
        prompts=conversations,
        responses=[chat_format.decode_reply(c.tokens) for c in completions],
        temperature=temperature,
        prompts_truncated=sum(len(p) < len(r) for p, r in zip(prompt_ids, rendered)),
    )


def repeat_prompts(rng: random.Random, prompts: list, n: int, k: int) -> list:
    """n prompts drawn with `rng`, each repeated k times in a row (the groups of GRPO and RLOO)."""
    return [p for p in (rng.choice(prompts) for _ in range(n)) for _ in range(k)]


# ------------------------------------------------------------------------------------------------------------------
# Log-probs
# ------------------------------------------------------------------------------------------------------------------


class _Tempered:
    """A model whose logits are divided by the sampling temperature (in float32, as the engine's sampler does)."""

    def __init__(self, model, temperature: float):
        self.model, self.temperature = model, temperature

    def hidden_states(self, ids):
        return self.model.hidden_states(ids)

    def token_logprobs(self, hidden, targets):
        return self.model.token_logprobs(hidden, targets, self.temperature)


def rollout_logprobs(model, rollout: Rollout, rows=slice(None), device="cpu", dtype=None,
                     return_hidden: bool = False):
    """(b, R) log-probs of each response token of ``rollout[rows]`` under `model` at the rollout's temperature
    (log-softmax of logits / T: the distribution the engine sampled from), 0 past the response; optionally the final
    hidden states (b, T, C) too, so a value head can share the forward pass. The one function PPO, GRPO and RLOO
    take their old, new and reference log-probs from."""
    prompt_lens = rollout.prompt_lens[rows].to(device)
    lengths = prompt_lens + rollout.response_lens[rows].to(device)
    scorer = model if rollout.temperature == 1.0 else _Tempered(model, rollout.temperature)
    return response_logprobs(scorer, rollout.ids[rows].to(device), prompt_lens, lengths,
                             width=rollout.sample_logprobs.shape[1], dtype=dtype, return_hidden=return_hidden)


@torch.no_grad()
def reference_logprobs(policy, reference, rollout: Rollout, device="cpu", dtype=None) -> torch.Tensor:
    """(B, R) log-probs under the frozen reference: the `reference` copy, or with LoRA (reference None) the policy
    with its adapters off."""
    if reference is not None:
        return rollout_logprobs(reference, rollout, device=device, dtype=dtype)
    with use_adapter(policy, None):
        return rollout_logprobs(policy, rollout, device=device, dtype=dtype)


def gather_actions(per_position: torch.Tensor, rollout: Rollout, rows=slice(None)) -> torch.Tensor:
    """(b, T) values per sequence position -> (b, R) at the positions that choose each response token."""
    index = rollout.action_index[rows].to(per_position.device)
    out = per_position.gather(1, index)
    return torch.where(rollout.mask[rows].to(out.device), out, torch.zeros((), device=out.device))


# ------------------------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------------------------


def reward_model_scorer(reward_model, tokenizer, device="cpu", dtype=None) -> Callable[[Rollout], torch.Tensor]:
    """Scores read at each response's own eot (an unfinished response is scored with an eot appended), through
    :func:`palmchat.inference.reward_scoring.score_responses`, of the very prompt ids the policy saw (the whole
    conversation): a sequence longer than the reward model's context loses the prompt's oldest tokens after bos, as
    in reward-model training. The forward runs on the reward model's own device (``device`` names the same place
    and is not needed)."""

    def score(rollout: Rollout) -> torch.Tensor:
        prompts, responses = [], []
        for row, (p, r) in enumerate(zip(rollout.prompt_lens.tolist(), rollout.response_lens.tolist())):
            prompts.append(rollout.ids[row, :p].tolist())
            responses.append(rollout.ids[row, p:p + r].tolist())
        chat = tokenizer.chat_format
        return score_responses(reward_model, prompts, responses, chat.eot_id, pad_id=chat.pad_id, dtype=dtype)

    return score


def verifier_scorer(world) -> Callable[[Rollout], torch.Tensor]:
    """A Python function as the reward ("verifiable rewards"): the bundled world's verifier score of each response
    to its whole conversation (the message list)."""

    def score(rollout: Rollout) -> torch.Tensor:
        return torch.tensor([float(world.verify(p, r).score) for p, r in zip(rollout.prompts, rollout.responses)])

    return score


def make_scorer(reward: str, tokenizer, device, dtype, seed: int = 0):
    """'verifier' or a reward-model checkpoint path -> (scorer, reward model or None)."""
    if reward == "verifier":
        from palmchat.world.synthetic import World

        return verifier_scorer(World(seed=seed)), None
    from palmchat.checkpoint.heads import load_reward_model

    reward_model, _ = load_reward_model(reward, device=device, eot_id=tokenizer.chat_format.eot_id, tokenizer=tokenizer)
    reward_model.eval().requires_grad_(False)
    return reward_model_scorer(reward_model, tokenizer, device, dtype), reward_model


def score_rollout(score_fn, rollout: Rollout, missing_eot_penalty: float) -> torch.Tensor:
    """(B,) float32 scores, minus the penalty for each response that never ended."""
    return score_fn(rollout).float() - missing_eot_penalty * (~rollout.finished).float()


def zero_variance_groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N / k,) bool: the groups of k consecutive samples whose scores are all equal (no learning signal)."""
    groups = scores.view(-1, k)
    return (groups == groups[:, :1]).all(dim=1)


# ------------------------------------------------------------------------------------------------------------------
# Updates, metrics, samples, resuming
# ------------------------------------------------------------------------------------------------------------------


def minibatches(rows: Sequence[int], minibatch: int, grad_accum: int) -> Iterator[list[torch.Tensor]]:
    """Each optimizer step's rows (consecutive `minibatch` of `rows`), split into `grad_accum` micro-batches."""
    for i in range(0, len(rows), minibatch):
        step = torch.tensor(list(rows[i:i + minibatch]), dtype=torch.long)
        yield [part for part in torch.tensor_split(step, grad_accum) if len(part)]


def rollout_metrics(rollout: Rollout, scores: torch.Tensor, old_logp: torch.Tensor) -> dict:
    """What every stage logs about a rollout batch. `entropy` is the per-token entropy of the sampling distribution
    estimated from the samples (-mean log-prob of the sampled tokens, unbiased); `logprob_mismatch` the largest and
    `logprob_mismatch_mean` the mean |trainer log-prob - engine log-prob| over response tokens."""
    mask = rollout.mask
    old = old_logp.detach().float().cpu()
    gap = (old - rollout.sample_logprobs)[mask].abs()
    return dict(score=scores.mean().item(), score_std=scores.std(unbiased=False).item(),
                length=rollout.response_lens.float().mean().item(), finished=rollout.finished.float().mean().item(),
                entropy=-masked_mean(old, mask).item(), logprob_mismatch=gap.max().item(),
                logprob_mismatch_mean=gap.mean().item(), prompts_truncated=rollout.prompts_truncated)


def write_samples(out: Path, step: int, rollout: Rollout, scores: torch.Tensor, n: int = 4) -> None:
    """Append the first n rollouts of this iteration to OUT/samples.jsonl and print them briefly."""
    rows = [{"step": step, "prompt": rollout.prompts[i], "response": rollout.responses[i],
             "score": round(float(scores[i]), 4)} for i in range(min(n, len(rollout.responses)))]
    with open(out / "samples.jsonl", "a") as f:
        f.write(jsonl_text(rows))
    print(f"\nsamples at iteration {step}:")
    for r in rows:
        print(f"  [{r['score']:+.2f}] {r['prompt'][-1]['content'][:60]!r} -> {r['response'][:60]!r}")


def start_or_resume(args: RLArgs, out: Path, modules: dict, optimizers: dict, rngs: dict) -> tuple[int, dict]:
    """(iterations done, the stage's JSON state): 0 and {} for a fresh run; with --resume the newest state in
    OUT/resume loaded into `modules`, `optimizers` and `rngs` in place, and OUT/samples.jsonl cut back to it
    (MetricsLog cuts metrics.jsonl)."""
    step, state = resume.start_or_resume(out, args.resume, modules, optimizers, rngs)
    if not args.resume:
        (out / "samples.jsonl").unlink(missing_ok=True)
        return step, state
    samples = out / "samples.jsonl"
    if samples.exists():
        write_jsonl(samples, [r for r in read_jsonl(samples) if r["step"] <= step])
    print(f"resuming from iteration {step}")
    return step, state


def maybe_save_state(args: RLArgs, out: Path, iteration: int, modules: dict, optimizers: dict, rngs: dict,
                     state: dict) -> None:
    """A resumable state every --save-every iterations (and after the last one, so a finished run can be
    extended)."""
    if args.save_every > 0 and (iteration % args.save_every == 0 or iteration == args.iterations):
        resume.save_state(out, iteration, modules, optimizers, rngs=rngs, state=state)
