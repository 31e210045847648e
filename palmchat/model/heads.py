"""Scalar heads on the PaLM backbone: the reward model and the PPO value model (critic).

Reward model (InstructGPT, Ouyang et al. 2022, https://arxiv.org/abs/2203.02155): the backbone's final
hidden state at the response's END-OF-TURN token goes through a linear head to one scalar.  Reading at
the explicit eot index (never "the last position", a pad, or a mean over tokens) makes the reward of a
(prompt, response) independent of how it is batched:

* right padding: the eot precedes the pads and attention is causal, so pads cannot influence it;
* left padding: pass ``padding_mask`` so positions restart at each row's first real token and
  pads are masked out as keys (see ``Transformer.hidden_states``).

The reward model can also read how far the reply is from what it would have said itself (``readout="eot+gap"``):
the score at the end-of-turn token plus a learned multiple of the reply's mean *logit gap*, each reply token's logit
under the backbone's own output layer minus the largest logit at its position (0 where the model would have
picked that token itself). On the bundled world's held-out questions the end-of-turn score alone reads little of
what the backbone knows (a fine-tuned model's own likelihood orders a correct reply over a wrong one far more
often than its reward head does); the gap hands that knowledge to the score directly (docs/decisions.md).

Saving and loading them: palmchat/checkpoint/heads.py. The end-of-turn id belongs to the tokenizer's chat format,
not to the model: it is passed in, and stored in the reward model's config so that the checkpoint reads its score
at the same token it was trained on.
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from palmchat.model.config import ModelConfig
from palmchat.model.length_chunks import map_length_chunks
from palmchat.model.transformer import Transformer

__all__ = ["end_of_turn_index", "rewards_by_length", "response_logit_gaps", "RewardModel", "ValueModel", "READOUTS"]

READOUTS = ("eot", "eot+gap")  # what a reward model's score reads: the end-of-turn state, plus the mean logit gap
GAP_BLOCK_BYTES = 64 << 20  # the float32 logits response_logit_gaps holds at a time


def end_of_turn_index(ids: Tensor, eot_id: int, padding_mask: Tensor | None = None,
                      start: Tensor | None = None) -> Tensor:
    """Index of each row's LAST end-of-turn token among real tokens: ``(N,)`` long.

    ``padding_mask`` (N, T) bool, True on real tokens (needed only if a pad could equal ``eot_id``).
    ``start`` (N,) optional: ignore eots before this index, e.g. the response start, so that a
    response that never ended is not silently scored at the end of the PROMPT's last turn.
    Raises ValueError naming the first row without one.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be (N, T), got shape {tuple(ids.shape)}")
    is_eot = ids == eot_id
    if padding_mask is not None:
        is_eot &= padding_mask.bool()
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    if start is not None:
        is_eot &= pos >= start.to(ids.device)[:, None]
    index = torch.where(is_eot, pos, torch.full_like(pos, -1)).amax(dim=1)
    missing = (index < 0).nonzero()
    if missing.numel():
        row = int(missing[0, 0])
        where = "" if start is None else f" at or after index {int(start[row])}"
        raise ValueError(f"row {row} has no end-of-turn token (id {eot_id}) among its real tokens{where}; "
                         f"{missing.numel()} row(s) affected")
    return index


def rewards_by_length(reward_model, ids: Tensor, eot_index: Tensor, max_rows: int | None = None,
                      response_start: Tensor | None = None) -> Tensor:
    """``reward_model(ids, eot_index, response_start=response_start)`` on right-padded rows that end at their eot,
    in chunks of similar length (model/length_chunks.py): the same rewards with little padding. ``max_rows`` caps
    the rows per pass."""
    def chunk_rewards(chunk, rows):
        start = None if response_start is None else response_start[rows]
        return reward_model(chunk, eot_index[rows], response_start=start)

    return map_length_chunks(chunk_rewards, ids, eot_index + 1, max_rows)


def response_logit_gaps(backbone: Transformer, hidden: Tensor, ids: Tensor, response_start: Tensor,
                        eot_index: Tensor) -> Tensor:
    """(N,) float32: each row's mean over its reply tokens ``ids[i, response_start[i]:eot_index[i] + 1]`` (its eot
    included) of the token's logit minus the largest logit at the position that predicts it, under ``backbone``'s
    output layer on ``hidden`` (N, T, C). Always <= 0; 0 for a reply the model would have written greedily.
    The vocabulary projection runs on the reply positions alone, GAP_BLOCK_BYTES of logits at a time, and is
    recomputed in backward instead of kept, so a large vocabulary costs one block of logits."""
    start = response_start.to(ids.device)
    if bool((start < 1).any()) or bool((start > eot_index).any()):
        raise ValueError("response_start must be >= 1 (the first token has no prediction) and at most eot_index")
    positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
    is_reply = (positions >= start[:, None]) & (positions <= eot_index[:, None])  # (N, T) reply tokens
    rows, cols = is_reply.nonzero(as_tuple=True)
    predicting, targets = hidden[rows, cols - 1], ids[rows, cols]

    def gaps(h: Tensor, t: Tensor) -> Tensor:
        logits = backbone.logits(h).float()
        return logits.gather(-1, t[:, None]).squeeze(-1) - logits.amax(-1)

    block = max(16, GAP_BLOCK_BYTES // (4 * backbone.config.vocab_size))
    parts = [torch.utils.checkpoint.checkpoint(gaps, predicting[i:i + block], targets[i:i + block],
                                               use_reentrant=False) if torch.is_grad_enabled()
             else gaps(predicting[i:i + block], targets[i:i + block])
             for i in range(0, len(rows), block)]
    total = torch.zeros(ids.shape[0], device=ids.device).index_add(0, rows, torch.cat(parts))
    return total / is_reply.sum(1).clamp_min(1)


def _make_head(dim: int) -> nn.Linear:
    head = nn.Linear(dim, 1)
    # unit-scale scalars from unit-scale normed hidden states (as in OpenAI's lm-human-preferences)
    nn.init.normal_(head.weight, std=1.0 / math.sqrt(dim + 1))
    nn.init.zeros_(head.bias)
    return head


class ScalarHeadModel(nn.Module):
    kind = ""

    def __init__(self, backbone: Transformer | ModelConfig):
        super().__init__()
        self.backbone = backbone if isinstance(backbone, Transformer) else Transformer(backbone)
        self.head = _make_head(self.backbone.config.dim)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    def head_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}

    def load_head_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """The inverse of head_state_dict; ValueError naming the tensors if they are not this model's."""
        expected = self.head_state_dict()
        if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
            got = {k: tuple(v.shape) for k, v in tensors.items()}
            want = {k: tuple(v.shape) for k, v in expected.items()}
            raise ValueError(f"head tensors {got} do not match the model's {want}")
        self.head.load_state_dict({k: tensors[k] for k in ("weight", "bias")})


class RewardModel(ScalarHeadModel):
    """PaLM backbone + ``Linear(dim, 1)``: a scalar reward read at the response's end-of-turn token, plus
    ``gap_weight`` times the reply's mean logit gap with ``readout="eot+gap"`` (module docstring)."""

    kind = "reward"
    end_of_turn_index = staticmethod(end_of_turn_index)

    def __init__(self, backbone: Transformer | ModelConfig, eot_id: int, readout: str = "eot"):
        """``eot_id``: the end-of-turn id of the tokenizer's chat format (``tokenizer.chat_format.eot_id``);
        ``readout``: one of READOUTS."""
        super().__init__(backbone)
        if readout not in READOUTS:
            raise ValueError(f"unknown reward readout {readout!r}: there are {', '.join(READOUTS)}")
        self.eot_id = eot_id
        self.readout = readout
        # starts at 1: a logit gap of -1 per token costs as much reward as one unit of the head's
        self.gap_weight = nn.Parameter(torch.ones(())) if readout == "eot+gap" else None

    def head_state_dict(self) -> dict[str, Tensor]:
        tensors = super().head_state_dict()
        if self.gap_weight is not None:
            tensors["gap_weight"] = self.gap_weight.detach().reshape(1).cpu()
        return tensors

    def load_head_state_dict(self, tensors: dict[str, Tensor]) -> None:
        super().load_head_state_dict(tensors)
        if self.gap_weight is not None:
            with torch.no_grad():
                self.gap_weight.copy_(tensors["gap_weight"].reshape(()))

    def forward(self, ids: Tensor, eot_index: Tensor, padding_mask: Tensor | None = None,
                check: bool = True, return_hidden: bool = False,
                response_start: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """ids (N, T), eot_index (N,) -> (N,) float32 rewards, read at ``ids[i, eot_index[i]]``.

        Right padding needs no mask; left padding needs ``padding_mask`` (True on real tokens).
        ``check`` verifies that every ``eot_index`` points at a real end-of-turn token.
        ``return_hidden`` also returns the backbone's (N, T, C) final hidden states.
        ``response_start`` (N,): the index of each reply's first token, which the "eot+gap" readout needs.
        """
        rows = torch.arange(ids.shape[0], device=ids.device)
        eot_index = eot_index.to(ids.device)
        if check:
            ok = ids[rows, eot_index] == self.eot_id
            if padding_mask is not None:
                ok &= padding_mask[rows, eot_index].bool()
            if not bool(ok.all()):
                row = int((~ok).nonzero()[0, 0])
                raise ValueError(f"eot_index[{row}] = {int(eot_index[row])} does not point at a real "
                                 f"end-of-turn token (id {self.eot_id}); found id {int(ids[row, eot_index[row]])}")
        hidden = self.backbone.hidden_states(ids, padding_mask=padding_mask)  # (N, T, C)
        rewards = self.head(hidden[rows, eot_index]).squeeze(-1).float()
        if self.gap_weight is not None:
            if response_start is None:
                raise ValueError("this reward model reads the reply's logit gap (readout 'eot+gap'): pass "
                                 "response_start, the index of each reply's first token")
            gaps = response_logit_gaps(self.backbone, hidden, ids, response_start, eot_index)
            rewards = rewards + self.gap_weight.float() * gaps
        return (rewards, hidden) if return_hidden else rewards

    def score(self, ids: Tensor, padding_mask: Tensor | None = None, start: Tensor | None = None) -> Tensor:
        """Rewards read at each row's last real eot (see :func:`end_of_turn_index`); ``start`` (N,), the index of
        each reply's first token, is where the eot is looked for and the reply the "eot+gap" readout reads."""
        index = end_of_turn_index(ids, self.eot_id, padding_mask, start)
        return self(ids, index, padding_mask, check=False, response_start=start)


class ValueModel(ScalarHeadModel):
    """PaLM backbone + ``Linear(dim, 1)``: a value estimate at every position (the PPO critic)."""

    kind = "value"

    def forward(self, ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """ids (N, T) -> (N, T) float32 values; entry t is V(state after token t)."""
        hidden = self.backbone.hidden_states(ids, padding_mask=padding_mask)
        return self.head(hidden).squeeze(-1).float()

    @classmethod
    def from_reward_model(cls, reward_model: RewardModel) -> ValueModel:
        """A critic initialised from a reward model (a copy of its backbone and head), as in InstructGPT."""
        value = cls(reward_model.config)
        value.backbone.load_state_dict(reward_model.backbone.state_dict())
        value.head.load_state_dict(reward_model.head.state_dict())
        p = next(reward_model.parameters())
        return value.to(device=p.device, dtype=p.dtype)
