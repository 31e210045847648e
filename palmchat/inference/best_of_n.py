"""Best-of-n sampling: test-time compute spent on a reward model instead of on training.

    result = best_of_n(engine, reward_model, prompt_ids, n=8, params=SamplingParams(max_new_tokens=64, seed=1),
                       eot_id=tokenizer.chat_format.eot_id)
    result.best, result.index, result.rewards, result.completions

How one call runs:

1. **One batched generate call** for the n samples (``best_of_n_batch``: for all prompts x n samples). If
   ``params.seed`` is set, sample j uses :func:`sample_seed` ``(params.seed, j)``, so the n samples are distinct
   draws and a repeated call gives the same samples; sample 0 uses ``params.seed`` itself, so best-of-1 is exactly
   ``engine.generate([prompt], params)``. Without a seed every row draws its own seed from torch's global RNG.
   ``eot_id`` is added to ``params.stop_token_ids`` (a reply ends at its end-of-turn token, where the reward is
   read), and ``max_new_tokens`` is lowered where needed so that prompt + reply + eot fit both models' contexts.
2. **One batched reward-model forward** (:func:`palmchat.inference.reward_scoring.score_responses`) over the
   right-padded sequences ``prompt + completion``, each read at its own end-of-turn token (the last real token
   of its row), so a reward does not depend on the batch it is in. A completion that does not end with eot --
   it hit the length limit, or stopped on a stop *sequence* (which the engine strips) -- gets eot appended
   **for scoring only**: the reward model was trained on replies that end in eot and has no other place to read
   a score. ``Completion.tokens`` is returned unchanged; a truncated reply is therefore scored as if it had
   ended there. ``best_of_n`` keeps prompt + reply + that eot within the reward model's context; when
   :func:`score_completions` is given a longer sequence, the prompt's oldest tokens after bos are dropped, the
   truncation reward-model training and PPO/GRPO use.
3. The returned ``best`` is the first completion with the highest reward (``index`` = its position).

The policy model runs inside ``engine`` (its dtype setting applies); the reward model runs in its own dtype under
``torch.no_grad``. Both must share the tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from palmchat.inference.engine import Completion, Engine, SamplingParams
from palmchat.inference.reward_scoring import score_responses

__all__ = ["BestOfN", "best_of_n", "best_of_n_batch", "sample_seed", "score_completions"]

_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: seeds of neighbouring samples are far apart
_SEED_MOD = 2**62


@dataclass
class BestOfN:
    best: Completion  # completions[index]
    rewards: list[float]  # one per completion, in sampling order
    completions: list[Completion]
    index: int  # argmax of rewards (the first one on ties)


def sample_seed(seed: int, j: int) -> int:
    """Seed of sample j of a request seeded with `seed`; sample 0 keeps `seed` itself."""
    return int(seed) if j == 0 else (int(seed) + j * _GOLDEN) % _SEED_MOD


def score_completions(reward_model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int] | Completion],
                      eot_id: int, batch_size: int | None = None, pad_id: int = 0) -> list[float]:
    """Reward of each ``prompt + completion`` through :func:`palmchat.inference.reward_scoring.score_responses`:
    eot appended when missing, right-padded, read at each row's eot, a sequence longer than the reward model's
    context cut by dropping the prompt's oldest tokens after bos (as in reward-model training).

    ``completions`` are Completion objects or token-id lists. ``batch_size=None`` scores all rows in one forward.
    The pad id is irrelevant to the result: pads follow each row's eot and attention is causal.
    """
    tokens = [c.tokens if isinstance(c, Completion) else c for c in completions]
    return score_responses(reward_model, prompts, tokens, eot_id, batch_size=batch_size, pad_id=pad_id).tolist()


def _request_params(engine: Engine, reward_model, prompt: Sequence[int], params: SamplingParams,
                    eot_id: int) -> SamplingParams:
    """params with eot as a stop token and max_new_tokens fitting both contexts (the scored eot included)."""
    if eot_id not in params.stop_token_ids:
        params = dataclasses.replace(params, stop_token_ids=params.stop_token_ids + (eot_id,))
    params = engine.clamp_max_new_tokens(prompt, params)  # raises if the prompt alone is too long
    room = reward_model.config.max_seq_len - len(prompt) - 1  # one slot for an appended eot
    if room < 0:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room for a reply in the reward model's "
                         f"context of {reward_model.config.max_seq_len} tokens")
    if params.max_new_tokens > room:
        params = dataclasses.replace(params, max_new_tokens=room)
    return params


def best_of_n_batch(engine: Engine, reward_model, prompts: Sequence[Sequence[int]], n: int,
                    params: SamplingParams | Sequence[SamplingParams], eot_id: int,
                    score_batch_size: int | None = None) -> list[BestOfN]:
    """Best-of-n for several prompts: all prompts x n samples in ONE generate call, then one scoring forward
    (or chunks of ``score_batch_size`` rows). ``params``: one for all prompts or one per prompt. With seeded
    params the result for each prompt equals ``best_of_n`` on that prompt alone."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    prompts = [list(p) for p in prompts]
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    params = list(params)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    if not prompts:
        return []
    flat_prompts, flat_params = [], []
    for prompt, p in zip(prompts, params):
        p = _request_params(engine, reward_model, prompt, p, eot_id)
        for j in range(n):
            flat_prompts.append(prompt)
            flat_params.append(p if p.seed is None else dataclasses.replace(p, seed=sample_seed(p.seed, j)))
    completions = engine.generate(flat_prompts, flat_params)
    rewards = score_completions(reward_model, flat_prompts, completions, eot_id, score_batch_size)
    out = []
    for b in range(len(prompts)):
        r, c = rewards[b * n:(b + 1) * n], completions[b * n:(b + 1) * n]
        index = max(range(n), key=lambda j: (r[j], -j))  # highest reward, first on ties
        out.append(BestOfN(best=c[index], rewards=r, completions=c, index=index))
    return out


def best_of_n(engine: Engine, reward_model, prompt_ids: Sequence[int], n: int, params: SamplingParams,
              eot_id: int) -> BestOfN:
    """Sample n completions of one prompt, score each with the reward model, return the highest-reward one."""
    return best_of_n_batch(engine, reward_model, [prompt_ids], n, params, eot_id)[0]
