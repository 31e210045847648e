"""Evaluate a chat policy on held-out prompts of the bundled world (``palmchat.world``).

    world = World(seed)
    prompts = world.prompts(200, "heldout")
    sft = evaluate_policy(sft_model, tokenizer, world, prompts, reward_model=rm)
    ppo = evaluate_policy(ppo_model, tokenizer, world, prompts, reference=sft_model, reward_model=rm,
                          baseline_scores=sft["scores"])
    bon = evaluate_best_of_n(sft_model, rm, tokenizer, world, prompts, ns=(1, 4, 16))
    # the same questions asked as later turns of conversations (earlier turns about other tasks, answered well)
    later = evaluate_policy(ppo_model, tokenizer, world, world.multi_turn_prompts(prompts, seed), ...)

A prompt is a str (sent as a single user message) or a conversation: a list of ``{"role", "content"}`` messages
ending with a user turn, rendered whole (system prompt and earlier turns included) by
``tokenizer.chat_format.render_prompt``; the reply answers its last turn, and the verifier resolves references to
earlier turns (``World.verify``). Replies stop at the end-of-turn token or after ``max_new_tokens`` (lowered per
prompt where prompt + reply would not fit the context).

Why sample at temperature 1.0 by default: RLHF changes the policy's *distribution* -- the KL penalty, the
reward and the preference losses are all defined on samples of it. SFT imitates a mixture of good, wrong, rude
and rambling demonstrations; greedy decoding picks the single most likely reply and hides that mixture (it
can make SFT look aligned, or an RL policy look unchanged). Sampling at temperature 1 measures what the model
actually says and is the distribution the KL below is about. Pass ``temperature=0`` for greedy numbers.

Seeds: prompt i is sampled with its own seed ``prompt_seed(seed, i)``, so results do not depend on the batch size
or on the other prompts, and two policies evaluated with the same seed get the same random numbers. In
:func:`evaluate_best_of_n`, sample j of prompt i uses ``sample_seed(prompt_seed(seed, i), j)`` (see
``palmchat.inference.best_of_n``); sample 0 is the same draw as :func:`generate_replies` makes, so best-of-1
equals the plain evaluation with the same seed.

Metrics of :func:`evaluate_policy` (means over prompts):

* ``correct``, ``style``, ``score``: the world's verifier (``World.verify``) on the decoded reply.
* ``reward``: the reward model's score of prompt + reply (eot appended to replies cut by the length limit).
* ``kl``: KL(policy || reference) per reply, estimated on the sampled replies with the k1 estimator
  ``sum over reply tokens of (log p_policy - log p_ref)`` (eot included when generated), both log-probs from
  plain forward passes over prompt + reply (not from the sampler). At temperature != 1 the replies come from the
  tempered policy, so this is then no longer an unbiased estimate of the KL of the untempered models.
* ``length``: reply tokens, the final eot not counted.
* ``win_rate``: against ``baseline_scores`` (per-prompt verifier scores of a baseline on the same prompts):
  win 1, tie 0.5, loss 0, averaged.
* ``scores``: per-prompt verifier scores (the ``baseline_scores`` of a later comparison); ``per_task``: mean
  score by task family; ``examples``: the first few (prompt, reply, verdict).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from palmchat.inference.best_of_n import best_of_n_batch, score_completions
from palmchat.inference.engine import Engine, SamplingParams
from palmchat.model.logprobs import response_logprobs

__all__ = ["Prompt", "Reply", "as_messages", "prompt_seed", "generate_replies", "evaluate_policy",
           "evaluate_best_of_n", "win_rate", "policy_kl"]

_SEED_STRIDE = 1_000_003


@dataclass
class Reply:
    text: str  # decoded, up to (not including) the eot
    tokens: list[int]  # generated ids, the eot included when the reply stopped on it
    logprobs: list[float]  # sampler log-probs (temperature-scaled distribution)
    finish_reason: str  # "stop" | "length"


def prompt_seed(seed: int, i: int) -> int:
    """Sampling seed of prompt i in an evaluation seeded with `seed`."""
    return (int(seed) * _SEED_STRIDE + int(i)) % 2**62


@contextlib.contextmanager
def _eval_mode(*models):
    """Put models in eval mode, restoring each one's training flag afterwards."""
    models = [m for m in models if m is not None]
    flags = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(models, flags):
            m.train(flag)


def _autocast(model, dtype):
    from palmchat.utils.device import autocast

    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return autocast(next(model.parameters()).device, dtype)


Prompt = str | list[dict]  # one user question, or messages ending with a user turn


def as_messages(prompt: Prompt) -> list[dict]:
    """A prompt as the messages to render: a str is one user turn; a conversation must end with a user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        raise ValueError(f"a prompt is a str or a non-empty list of {{'role', 'content'}} messages, got {prompt!r:.80}")
    if prompt[-1]["role"] != "user":
        raise ValueError(f"a conversation prompt must end with a user turn, not {prompt[-1]['role']!r}")
    return list(prompt)


def _prompt_ids(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of prompts, not a single string")
    if prompts and isinstance(prompts[0], dict):
        raise ValueError("prompts must be a list of prompts, not one conversation (wrap it in a list)")
    return [tokenizer.chat_format.render_prompt(as_messages(p)) for p in prompts]


def _params(engine: Engine, prompt_ids, temperature, max_new_tokens, seed, eot_id) -> list[SamplingParams]:
    return [engine.clamp_max_new_tokens(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                            stop_token_ids=(eot_id,), seed=prompt_seed(seed, i)))
            for i, ids in enumerate(prompt_ids)]


def _replies(tokenizer, completions) -> list[Reply]:
    return [Reply(tokenizer.chat_format.decode_reply(c.tokens), list(c.tokens), list(c.logprobs), c.finish_reason)
            for c in completions]


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: Sequence[Prompt], temperature: float = 1.0, max_new_tokens: int = 48,
                     seed: int = 0, batch_size: int = 64, dtype: torch.dtype | None = None) -> list[Reply]:
    """One sampled reply per prompt (a str or a conversation), in batches of ``batch_size`` prompts.

    ``dtype``: passed to :class:`Engine` (None runs the model as it is; bf16 uses a packed inference copy).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompt_ids = _prompt_ids(tokenizer, prompts)
    engine = Engine(model, dtype=dtype)
    params = _params(engine, prompt_ids, temperature, max_new_tokens, seed, tokenizer.chat_format.eot_id)
    out: list[Reply] = []
    with _eval_mode(model):
        for i in range(0, len(prompt_ids), batch_size):
            out += _replies(tokenizer, engine.generate(prompt_ids[i:i + batch_size], params[i:i + batch_size]))
    return out


@torch.no_grad()
def policy_kl(model, reference, prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
              batch_size: int = 64, dtype: torch.dtype | None = None, pad_id: int = 0) -> list[float]:
    """Per-response k1 estimate of KL(policy || reference): sum of (log p_model - log p_reference) over the
    response tokens, each model scoring prompt + response in plain forward passes of ``batch_size`` rows."""
    from palmchat.data.chat import pad_right

    prompt_ids, responses = [list(p) for p in prompt_ids], [list(r) for r in responses]
    if not prompt_ids:
        return []
    ids, lengths = pad_right([p + r for p, r in zip(prompt_ids, responses)], pad_id)
    prompt_lens = torch.tensor([len(p) for p in prompt_ids])

    def summed(m) -> list[float]:
        device = next(m.parameters()).device
        return response_logprobs(m, ids.to(device), prompt_lens.to(device), lengths.to(device), reduce="sum",
                                 dtype=dtype, batch_size=batch_size).tolist()

    with _eval_mode(model, reference):
        lp, lr = summed(model), summed(reference)
    return [a - b for a, b in zip(lp, lr)]


def win_rate(scores: Sequence[float], baseline_scores: Sequence[float], tie_tol: float = 1e-9) -> float:
    """Mean over prompts of 1 (score > baseline), 0.5 (equal within tie_tol) or 0 (lower)."""
    if len(scores) != len(baseline_scores):
        raise ValueError(f"{len(scores)} scores but {len(baseline_scores)} baseline scores: they must be the "
                         f"per-prompt scores on the same prompts")
    if not scores:
        raise ValueError("win_rate: no scores")
    total = 0.0
    for s, b in zip(scores, baseline_scores):
        total += 0.5 if abs(s - b) <= tie_tol else (1.0 if s > b else 0.0)
    return total / len(scores)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def evaluate_policy(model, tokenizer, world, prompts: Sequence[Prompt], *, reference=None, reward_model=None,
                    baseline_scores: Sequence[float] | None = None, temperature: float = 1.0, seed: int = 0,
                    max_new_tokens: int = 48, batch_size: int = 64, n_examples: int = 3,
                    dtype: torch.dtype | None = None) -> dict:
    """Sample one reply per prompt and measure it (see the module docstring for each key).

    Returns a dict with ``n, correct, style, score, length, scores, per_task, examples, temperature, seed`` and,
    when the matching argument is given, ``reward``, ``kl``, ``win_rate``. ``dtype`` (bf16/fp16) runs generation
    on the engine's inference copy and the scoring forwards under autocast; None keeps the models' own dtype.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate_policy: no prompts")
    replies = generate_replies(model, tokenizer, prompts, temperature=temperature, max_new_tokens=max_new_tokens,
                               seed=seed, batch_size=batch_size, dtype=dtype)
    verdicts = [world.verify(p, r.text) for p, r in zip(prompts, replies)]
    scores = [v.score for v in verdicts]
    eot = tokenizer.chat_format.eot_id
    per_task: dict[str, list[float]] = {}
    for v in verdicts:
        per_task.setdefault(v.task, []).append(v.score)
    result = {
        "n": len(prompts),
        "correct": _mean(v.correct for v in verdicts),
        "style": _mean(v.style for v in verdicts),
        "score": _mean(scores),
        "length": _mean(len(r.tokens) - (1 if r.tokens and r.tokens[-1] == eot else 0) for r in replies),
        "finished": _mean(r.finish_reason == "stop" for r in replies),
        "scores": scores,
        "per_task": {task: _mean(s) for task, s in sorted(per_task.items())},
        "temperature": temperature,
        "seed": seed,
    }
    prompt_ids = _prompt_ids(tokenizer, prompts)
    rewards = None
    if reward_model is not None:
        with _autocast(reward_model, dtype):
            rewards = score_completions(reward_model, prompt_ids, [r.tokens for r in replies], eot, batch_size,
                                        pad_id=tokenizer.chat_format.pad_id)
        result["reward"] = _mean(rewards)
    if reference is not None:
        result["kl"] = _mean(policy_kl(model, reference, prompt_ids, [r.tokens for r in replies], batch_size,
                                       dtype, tokenizer.chat_format.pad_id))
    if baseline_scores is not None:
        result["win_rate"] = win_rate(scores, baseline_scores)
    result["examples"] = [
        {"prompt": p, "reply": r.text, "finish_reason": r.finish_reason, "verdict": dataclasses.asdict(v),
         **({"reward": rewards[i]} if rewards is not None else {})}
        for i, (p, r, v) in enumerate(zip(prompts[:n_examples], replies, verdicts))
    ]
    return result


def evaluate_best_of_n(model, reward_model, tokenizer, world, prompts: Sequence[Prompt], ns: Sequence[int] = (1, 4, 16),
                       temperature: float = 1.0, seed: int = 0, max_new_tokens: int = 48, batch_size: int = 64,
                       dtype: torch.dtype | None = None) -> dict[int, dict]:
    """Best-of-n by reward model, for each n in ``ns``: ``{n: {"score", "correct", "style", "reward",
    "oracle_score"}}`` (means over prompts).

    max(ns) samples are drawn per prompt once; best-of-n picks, among the first n of them, the one with the
    highest reward (``best_of_n`` on n would draw exactly these n samples). ``reward`` is the chosen reply's
    reward; ``oracle_score`` the best verifier score among the n (what a perfect reward model would reach).
    ``batch_size`` counts generated rows (prompts x max(ns)) per generate call.
    """
    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1:
        raise ValueError(f"ns must be positive integers, got {ns}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate_best_of_n: no prompts")
    n_max = ns[-1]
    prompt_ids = _prompt_ids(tokenizer, prompts)
    engine = Engine(model, dtype=dtype)
    eot = tokenizer.chat_format.eot_id
    params = _params(engine, prompt_ids, temperature, max_new_tokens, seed, eot)
    per_call = max(1, batch_size // n_max)
    results = []
    with _eval_mode(model, reward_model), torch.no_grad(), _autocast(reward_model, dtype):
        for i in range(0, len(prompt_ids), per_call):
            results += best_of_n_batch(engine, reward_model, prompt_ids[i:i + per_call], n_max,
                                       params[i:i + per_call], eot, score_batch_size=batch_size)
    out: dict[int, dict] = {}
    verdicts = [[world.verify(p, tokenizer.chat_format.decode_reply(c.tokens)) for c in r.completions]
                for p, r in zip(prompts, results)]
    for n in ns:
        chosen = [max(range(n), key=lambda j: (r.rewards[j], -j)) for r in results]
        picked = [v[j] for v, j in zip(verdicts, chosen)]
        out[n] = {
            "score": _mean(v.score for v in picked),
            "correct": _mean(v.correct for v in picked),
            "style": _mean(v.style for v in picked),
            "reward": _mean(r.rewards[j] for r, j in zip(results, chosen)),
            "oracle_score": _mean(max(v.score for v in vs[:n]) for vs in verdicts),
        }
    return out
