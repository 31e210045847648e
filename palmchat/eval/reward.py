"""Reward-model metrics: how well a reward model orders held-out rankings the way labellers did (pairwise accuracy
and Kendall's tau), scored exactly as best-of-n and PPO/GRPO score responses; and the ceilings to read that accuracy
against, for rankings from the bundled world's simulated labellers (`ranking_ceilings`)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import torch

from palmchat import checkpoint
from palmchat.checkpoint.heads import load_reward_model
from palmchat.data.chat import group_by_ranking
from palmchat.inference.reward_scoring import score_responses
from palmchat.model.heads import RewardModel
from palmchat.utils.device import autocast_dtype, pick_device


def ranking_metrics(rewards: torch.Tensor, num_responses: torch.Tensor) -> dict:
    """rewards (B, K_max), column j = the response labelers ranked j-th. Pairwise accuracy and Kendall's tau,
    averaged over prompts (ties count as half right)."""
    accs, taus = [], []
    for row, k in zip(rewards.tolist(), num_responses.tolist()):
        score = 0.0
        for i in range(k):
            for j in range(i + 1, k):
                score += 1.0 if row[i] > row[j] else (0.5 if row[i] == row[j] else 0.0)
        pairs = k * (k - 1) / 2
        accs.append(score / pairs)
        taus.append(2 * score / pairs - 1)  # (concordant - discordant) / pairs
    return {"pairwise_accuracy": sum(accs) / len(accs), "kendall_tau": sum(taus) / len(taus)}


def score_rankings(model: RewardModel, tokenizer, rankings, max_len, batch_size, device, dtype):
    """(B, K_max) rewards for a list of rankings, and their K: ``batch_size`` rankings per forward through
    :func:`palmchat.inference.reward_scoring.score_responses`, so held-out responses are scored exactly as
    best-of-n and PPO/GRPO score theirs (and as :func:`ranking_batch` builds them for training). ``device`` is
    where the model is."""
    rows, ks = [], []
    for i in range(0, len(rankings), batch_size):
        chunk = rankings[i:i + batch_size]
        prompts, responses = [], []
        for r in chunk:
            prompt = tokenizer.chat_format.render_prompt(r.prompt_messages)
            prompts += [prompt] * len(r.responses)
            responses += [tokenizer.encode(text) for text in r.responses]
        num = torch.tensor([len(r.responses) for r in chunk], dtype=torch.long)
        chat = tokenizer.chat_format
        rewards = score_responses(model, prompts, responses, chat.eot_id, max_len, pad_id=chat.pad_id, dtype=dtype)
        rows.append(group_by_ranking(rewards, num, fill=float("nan")))
        ks.append(num)
    width = max(r.shape[1] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, width - r.shape[1]), value=float("nan")) for r in rows]
    return torch.cat(rows), torch.cat(ks)


def pairwise_accuracy(reward_model_path: str | Path, rankings: list, dtype_setting: str = "auto") -> float:
    """Held-out pairwise accuracy of a reward-model checkpoint on Ranking objects (palmchat.data.chat)."""

    device = pick_device("auto")
    tokenizer = checkpoint.load_tokenizer(checkpoint.resolve(reward_model_path))
    model, _ = load_reward_model(reward_model_path, device=device, eot_id=tokenizer.chat_format.eot_id)
    rewards, ks = score_rankings(model, tokenizer, rankings, model.config.max_seq_len, 16, device,
                                 autocast_dtype(dtype_setting, device))
    return ranking_metrics(rewards, ks)["pairwise_accuracy"]


def world_prompt(messages: list[dict]) -> str | list[dict]:
    """The prompt as the bundled world takes it: the text of a conversation's one user turn (a system prompt does
    not change the task), else the whole message list."""
    users = [m for m in messages if m["role"] == "user"]
    return users[0]["content"] if len(users) == 1 else messages


def world_knows(world, rankings) -> bool:
    """Whether the world's verifier knows every ranking's prompt (else its labellers rank by noise alone, and a
    ceiling computed from them means nothing)."""
    return all(world.verify(world_prompt(r.prompt_messages), "").task != "unknown" for r in rankings)


def labeller_agreement(world, rankings, noise: float, seed: int = 0, labellers: int = 4) -> float:
    """How often two independent simulated labellers (``world.rank`` with ``noise``, each its own random stream)
    order a pair of responses the same way, on the very responses of ``rankings``: the inter-labeller agreement
    InstructGPT reads its reward model's accuracy against (72.6% for its labellers, Ouyang et al. 2022 §5.1).
    Averaged like :func:`ranking_metrics`: over each ranking's pairs, then over rankings. ``labellers`` >= 2 draws
    are averaged over all their pairs: the same expectation as two draws, with less variance."""
    if labellers < 2:
        raise ValueError("labeller agreement needs at least 2 labellers")
    rngs = [random.Random(f"labeller-agreement|{seed}|{i}") for i in range(labellers)]
    per_ranking = []
    for r in rankings:
        prompt, k = world_prompt(r.prompt_messages), len(r.responses)
        positions = []  # per labeller: response index -> place in its ranking
        for rng in rngs:
            order = world.rank(prompt, list(r.responses), rng, noise)
            positions.append({response: place for place, response in enumerate(order)})
        agree = total = 0
        for a, b in itertools.combinations(positions, 2):
            for i, j in itertools.combinations(range(k), 2):
                agree += (a[i] < a[j]) == (b[i] < b[j])
                total += 1
        per_ranking.append(agree / total)
    return sum(per_ranking) / len(per_ranking)


def verifier_rewards(world, rankings) -> tuple[torch.Tensor, torch.Tensor]:
    """The world's noise-free verifier scores as (B, K_max) rewards in :func:`score_rankings`' layout."""
    k_max = max(len(r.responses) for r in rankings)
    rows = [[world.verify(world_prompt(r.prompt_messages), text).score for text in r.responses]
            + [float("nan")] * (k_max - len(r.responses)) for r in rankings]
    return torch.tensor(rows, dtype=torch.float64), torch.tensor([len(r.responses) for r in rankings])


def ranking_ceilings(world, rankings, noise: float, seed: int = 0) -> dict | None:
    """Two ceilings for a reward model's held-out pairwise accuracy on rankings made by the world's simulated
    labellers, or None when the world does not know every prompt:

    * ``labeller_agreement``: two independent labellers agree on this fraction of pairs (:func:`labeller_agreement`);
    * ``verifier_accuracy``: the pairwise accuracy, against these very labels, of a reward model that knew the
      world's true (noise-free) score: the most any reward model can expect. It is above the agreement of two
      noisy labellers, since only the labels are noisy then (ties in the true score count half).
    """
    if not rankings or not world_knows(world, rankings):
        return None
    rewards, ks = verifier_rewards(world, rankings)
    return {"labeller_agreement": labeller_agreement(world, rankings, noise, seed),
            "verifier_accuracy": ranking_metrics(rewards, ks)["pairwise_accuracy"]}
