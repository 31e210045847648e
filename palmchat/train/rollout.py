"""What PPO and GRPO share: sampling responses with the engine, scoring them, and the per-token
log-probs of those responses under a model, laid out response-aligned as (B, R)
(:func:`palmchat.model.logprobs.response_logprobs` applied to a :class:`Rollout`).

The traps handled here, each tested in tests/test_rl.py:
- prompts are token ids rendered once and never re-tokenised; responses keep the sampled ids;
- the log-probs recomputed by a training forward pass equal those the engine sampled with (temperature 1);
- the reward is read at the response's own end-of-turn token (right-padded batch, index = length - 1);
- a response that never ends gets its eot appended for scoring plus a penalty, rather than being scored at a pad;
- a sequence longer than the reward model's context loses the prompt's oldest tokens after bos, as in
  reward-model training and best-of-n (one scoring path: palmchat.inference.reward_scoring).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from palmchat.data.chat import pad_right
from palmchat.inference.engine import Engine, SamplingParams
from palmchat.inference.reward_scoring import score_responses
from palmchat.model.logprobs import response_logprobs, response_positions
from palmchat.world.defaults import bundled_prompts


@dataclass
class Rollout:
    ids: torch.Tensor  # (B, T) prompt + response, right-padded
    prompt_lens: torch.Tensor  # (B,)
    response_lens: torch.Tensor  # (B,) response tokens, eot included when finished
    finished: torch.Tensor  # (B,) bool: the response ended with eot
    sample_logprobs: torch.Tensor  # (B, R) log-probs the engine sampled with, 0 past each response
    prompts: list[str]  # prompt text (user message), for verifiers
    responses: list[str]  # decoded response text

    @property
    def mask(self) -> torch.Tensor:  # (B, R) True on response tokens
        R = self.sample_logprobs.shape[1]
        return torch.arange(R)[None, :] < self.response_lens[:, None]

    @property
    def action_index(self) -> torch.Tensor:
        """(B, R): the position whose logits predict each response token (one before it), clamped in range."""
        return response_positions(self.prompt_lens, self.sample_logprobs.shape[1], self.ids.shape[1])


def sample(engine: Engine, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
           temperature: float = 1.0) -> Rollout:
    """One batched, KV-cached generation per prompt (repeat prompts for GRPO groups)."""
    chat_format = tokenizer.chat_format
    prompt_ids = [chat_format.render_prompt([{"role": "user", "content": p}]) for p in prompts]
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed * 100_003 + i,
                             stop_token_ids=(chat_format.eot_id,)) for i in range(len(prompts))]
    params = [engine.clamp_max_new_tokens(p, q) for p, q in zip(prompt_ids, params)]
    completions = engine.generate(prompt_ids, params)
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
        prompts=list(prompts),
        responses=[chat_format.decode_reply(c.tokens) for c in completions],
    )


def rollout_logprobs(model, rollout: Rollout, rows=slice(None), device="cpu", dtype=None,
                     return_hidden: bool = False):
    """(b, R) log-probs of each response token of ``rollout[rows]`` under `model` (0 past the response);
    optionally the final hidden states (b, T, C) too, so a value head can share the forward pass."""
    prompt_lens = rollout.prompt_lens[rows].to(device)
    lengths = prompt_lens + rollout.response_lens[rows].to(device)
    return response_logprobs(model, rollout.ids[rows].to(device), prompt_lens, lengths,
                             width=rollout.sample_logprobs.shape[1], dtype=dtype, return_hidden=return_hidden)


def gather_actions(per_position: torch.Tensor, rollout: Rollout, rows=slice(None)) -> torch.Tensor:
    """(b, T) values per sequence position -> (b, R) at the positions that choose each response token."""
    index = rollout.action_index[rows].to(per_position.device)
    out = per_position.gather(1, index)
    return torch.where(rollout.mask[rows].to(out.device), out, torch.zeros((), device=out.device))


def reward_model_scorer(reward_model, tokenizer, device="cpu", dtype=None) -> Callable[[Rollout], torch.Tensor]:
    """Scores read at each response's own eot (an unfinished response is scored with an eot appended), through
    :func:`palmchat.inference.reward_scoring.score_responses`: a sequence longer than the reward model's context
    loses the prompt's oldest tokens after bos, as in reward-model training. The forward runs on the reward
    model's own device (``device`` names the same place and is not needed)."""

    def score(rollout: Rollout) -> torch.Tensor:
        prompts, responses = [], []
        for row, (p, r) in enumerate(zip(rollout.prompt_lens.tolist(), rollout.response_lens.tolist())):
            prompts.append(rollout.ids[row, :p].tolist())
            responses.append(rollout.ids[row, p:p + r].tolist())
        chat = tokenizer.chat_format
        return score_responses(reward_model, prompts, responses, chat.eot_id, pad_id=chat.pad_id, dtype=dtype)

    return score


def verifier_scorer(world) -> Callable[[Rollout], torch.Tensor]:
    """A Python function as the reward ("verifiable rewards"): the bundled world's verifier score."""

    def score(rollout: Rollout) -> torch.Tensor:
        return torch.tensor([world.verify(p, r).score for p, r in zip(rollout.prompts, rollout.responses)])

    return score


def make_scorer(reward: str, tokenizer, device, dtype, seed: int = 0):
    """'verifier' or a reward-model checkpoint path -> (scorer, reward model or None)."""
    if reward == "verifier":
        from palmchat.world.synthetic import World

        return verifier_scorer(World(seed=seed)), None
    from palmchat.checkpoint.heads import load_reward_model

    reward_model, _ = load_reward_model(reward, device=device, eot_id=tokenizer.chat_format.eot_id)
    reward_model.eval().requires_grad_(False)
    return reward_model_scorer(reward_model, tokenizer, device, dtype), reward_model


def load_prompt_texts(paths: list[str], seed: int) -> list[str]:
    """User prompts from JSONL files ({'prompt': str} or {'messages': [...]}: the last user turn), or the bundled
    ones."""
    if not paths:
        return bundled_prompts(seed)
    from palmchat.data.chat import load_prompts

    texts = []
    for path in paths:
        for messages in load_prompts(path):
            texts.append(messages[-1]["content"])
    if not texts:
        raise ValueError("no prompts in " + ", ".join(paths))
    return texts
