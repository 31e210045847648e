"""Reward-model scores of (prompt, response) pairs given as token ids: the one scoring path of best-of-n, the
PPO/GRPO rollout scorer and reward-model validation.

    rewards = score_responses(reward_model, prompts, responses, eot_id=tokenizer.chat_format.eot_id,
                              pad_id=tokenizer.chat_format.pad_id)

Each pair becomes ``prompt + response + eot`` cut to the reward model's context by
:func:`palmchat.data.chat.scoring_sequences`, the one truncation policy: rows with the same prompt are scored as
one ranking, whose prompt loses its oldest tokens after bos once, for all of them (as reward-model training cuts a
ranking), so the candidates of best-of-n or of a GRPO group are compared on the same context, and a long
conversation gets the same score at training time, in best-of-n and in PPO/GRPO. Rows are
right-padded and each is read at its own end-of-turn token (its last real token): pads follow the eot and
attention is causal, so a score does not depend on the batch it is in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from palmchat.data.chat import pad_right, scoring_sequences
from palmchat.model.heads import rewards_by_length
from palmchat.utils.device import autocast

__all__ = ["score_responses"]


@torch.no_grad()
def score_responses(reward_model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], eot_id: int,
                    max_len: int | None = None, batch_size: int | None = None, pad_id: int = 0,
                    dtype: torch.dtype | None = None, max_prompt_len: int = 0) -> torch.Tensor:
    """``(N,)`` float32 CPU rewards of ``prompts[i] + responses[i]``, read at each response's eot.

    ``prompts`` are rendered prompts (bos first, the assistant token last); ``responses`` the replies' ids, with
    or without their eot (a reply cut short is scored as if it had ended there). ``max_len`` defaults to the
    reward model's context; ``max_prompt_len`` caps the prompt as in training (0: no cap of its own). Rows with
    equal prompts share one prompt cut (module docstring). ``batch_size`` caps the rows per forward (None: no cap);
    ``dtype`` runs the forward under autocast (None: the model's own dtype). The model is put in eval mode for
    the call and restored after.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_len = max_len or reward_model.config.max_seq_len
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(int(t) for t in p), []).append(i)
    seqs: list[list[int]] = [[] for _ in prompts]
    starts = [0] * len(prompts)  # where each reply begins after its prompt's cut
    for prompt, rows in groups.items():
        for i, encoded in zip(rows, scoring_sequences(prompt, [responses[i] for i in rows], max_len, eot_id,
                                                      max_prompt_len)):
            seqs[i], starts[i] = encoded.ids, encoded.prompt_len
    if not seqs:
        return torch.zeros(0)
    device = next(reward_model.parameters()).device
    was_training = reward_model.training
    reward_model.eval()
    try:
        ids, lengths = pad_right(seqs, pad_id)
        with autocast(device, dtype):  # rows of similar length together, little padding (model/length_chunks.py)
            rewards = rewards_by_length(reward_model, ids.to(device), (lengths - 1).to(device), batch_size,
                                        response_start=torch.tensor(starts, device=device))
        return rewards.float().cpu()
    finally:
        reward_model.train(was_training)
