"""Reward-model scores of (prompt, response) pairs given as token ids: the one scoring path of best-of-n, the
PPO/GRPO rollout scorer and reward-model validation.

    rewards = score_responses(reward_model, prompts, responses, eot_id=tokenizer.chat_format.eot_id,
                              pad_id=tokenizer.chat_format.pad_id)

Each pair becomes :func:`palmchat.data.chat.scoring_sequence` (``prompt + response + eot``, cut to the reward
model's context by dropping the prompt's oldest tokens after bos), the same sequence reward-model training
builds, so a long conversation gets the same score at training time, in best-of-n and in PPO/GRPO. Rows are
right-padded and each is read at its own end-of-turn token (its last real token): pads follow the eot and
attention is causal, so a score does not depend on the batch it is in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from palmchat.data.chat import pad_right, scoring_sequence
from palmchat.utils.device import autocast

__all__ = ["score_responses"]


@torch.no_grad()
def score_responses(reward_model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], eot_id: int,
                    max_len: int | None = None, batch_size: int | None = None, pad_id: int = 0,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(N,)`` float32 CPU rewards of ``prompts[i] + responses[i]``, read at each response's eot.

    ``prompts`` are rendered prompts (bos first, the assistant token last); ``responses`` the replies' ids, with
    or without their eot (a reply cut short is scored as if it had ended there). ``max_len`` defaults to the
    reward model's context. ``batch_size=None`` scores all rows in one forward; ``dtype`` runs the forward under
    autocast (None: the model's own dtype). The model is put in eval mode for the call and restored after.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_len = max_len or reward_model.config.max_seq_len
    seqs = [scoring_sequence(p, r, max_len, eot_id).ids for p, r in zip(prompts, responses)]
    if not seqs:
        return torch.zeros(0)
    device = next(reward_model.parameters()).device
    was_training = reward_model.training
    reward_model.eval()
    try:
        out = []
        step = batch_size or len(seqs)
        for i in range(0, len(seqs), step):
            ids, lengths = pad_right(seqs[i:i + step], pad_id)
            with autocast(device, dtype):
                out.append(reward_model(ids.to(device), (lengths - 1).to(device)).float().cpu())
        return torch.cat(out)
    finally:
        reward_model.train(was_training)
