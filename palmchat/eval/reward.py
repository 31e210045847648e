"""Reward-model metrics: how well a reward model orders held-out rankings the way labellers did (pairwise accuracy
and Kendall's tau), scored exactly as best-of-n and PPO/GRPO score responses."""

from __future__ import annotations

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
