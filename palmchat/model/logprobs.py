"""Log-probs of responses under a model: one forward pass over prompt + response, each response token scored by
the hidden state one position before it through the model's output layer (``Transformer.token_logprobs``: only
response positions are projected, and no (rows, tokens, vocabulary) logits are kept).

Every stage that scores responses calls :func:`response_logprobs`: PPO and GRPO (old, new and reference
log-probs per token), DPO (summed or mean per response, for the policy and the reference) and the evaluation's
KL to the reference (summed per response). One function, so the log-probs a stage trains on and the ones it is
measured with come from the same forward pass and the same arithmetic.

Rows are right-padded: row i is ``ids[i, :lengths[i]]`` and its response is ``ids[i, prompt_lens[i]:lengths[i]]``
(its end-of-turn token included when there is one). A causal model needs no mask for right padding, because real
tokens never attend to the pads after them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from palmchat.model.length_chunks import map_length_chunks
from palmchat.utils.device import autocast

__all__ = ["response_positions", "response_logprobs"]


def response_positions(prompt_lens: Tensor, width: int, seq_len: int) -> Tensor:
    """(N, width) position whose logits predict response token j of each row: ``prompt_lens - 1 + j``.

    Clamped to ``seq_len - 2``, the last position that predicts a token, so that columns past a short response
    still index inside the sequence (mask them out).
    """
    index = prompt_lens[:, None] - 1 + torch.arange(width, device=prompt_lens.device)[None, :]
    return index.clamp(max=seq_len - 2)


def response_logprobs(model, ids: Tensor, prompt_lens: Tensor, lengths: Tensor, *,
                      reduce: Literal["none", "sum", "mean"] = "none", width: int | None = None,
                      dtype: torch.dtype | None = None, batch_size: int | None = None,
                      return_hidden: bool = False):
    """Log-probs of each row's response tokens under ``model`` (a Transformer: ``hidden_states`` and ``logits``).

    Args:
        model: scores ``ids``; its parameters live on ``ids.device``.
        ids (Tensor): (N, T) prompt + response, right-padded.
        prompt_lens (Tensor): (N,) prompt tokens of each row (>= 1: the first token has no prediction).
        lengths (Tensor): (N,) real tokens of each row.
        reduce (str): ``"none"``: (N, width) per-token log-probs, response-aligned (column j is response token
            j) and 0 past each response, as PPO and GRPO use them; ``"sum"``: (N,) summed over each response, as
            DPO and the KL estimate use them; ``"mean"``: (N,) their average (IPO's length-normalised log-probs).
        width (Optional[int]): columns of the ``"none"`` result; default the longest response. A minibatch of a
            rollout passes the rollout's width so its rows line up with the whole rollout's.
        dtype (Optional[torch.dtype]): bf16 or fp16 runs the forward pass under autocast; anything else (None,
            fp32) runs the model as it is. The log-probs themselves are always computed in float32.
        batch_size (Optional[int]): forward at most this many rows at a time (memory). Whatever it is, the rows
            go through the model in chunks of similar length, each cut to its own longest row
            (``length_chunks.py``), so a long row costs the short ones nothing.
        return_hidden (bool): also return the (N, T, C) final hidden states, so a value head can share the
            forward pass (then all rows go in one pass, padded to the longest: not with ``batch_size``).

    Returns:
        Tensor: the log-probs in float32 (see ``reduce``), or ``(log-probs, hidden)`` with ``return_hidden``.
        Gradients flow unless the caller disables them.
    """
    if reduce not in ("none", "sum", "mean"):
        raise ValueError(f"reduce must be 'none', 'sum' or 'mean', not {reduce!r}")
    if reduce == "none" and width is None:
        width = int((lengths - prompt_lens).max()) if len(lengths) else 0
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if return_hidden:
            raise ValueError("return_hidden needs a single forward pass: pass batch_size=None")
    if bool((prompt_lens < 1).any()):
        raise ValueError("prompt_lens must be >= 1 (the first token has no prediction)")
    if return_hidden or len(lengths) < 2:
        return _response_logprobs(model, ids, prompt_lens, lengths, reduce, width, dtype, return_hidden)
    return map_length_chunks(lambda chunk, rows: _response_logprobs(model, chunk, prompt_lens[rows], lengths[rows],
                                                                    reduce, width, dtype),
                             ids, lengths, batch_size)


def _response_logprobs(model, ids, prompt_lens, lengths, reduce, width, dtype, return_hidden=False):
    columns = width if reduce == "none" else (int((lengths - prompt_lens).max()) if len(lengths) else 0)
    positions = response_positions(prompt_lens, columns, ids.shape[1])  # (N, columns)
    in_response = torch.arange(columns, device=ids.device)[None, :] < (lengths - prompt_lens)[:, None]
    targets = torch.where(in_response, ids.gather(1, positions + 1), -1)  # -1: no log-prob, no gradient
    with autocast(ids.device, dtype if dtype in (torch.bfloat16, torch.float16) else None):
        hidden = model.hidden_states(ids)
        # only the response positions go through the output layer: a prompt's logits are never needed
        at_positions = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        logp = model.token_logprobs(at_positions, targets)  # (N, columns), 0 past each response
    if reduce != "none":
        logp = logp.sum(1)
        if reduce == "mean":
            logp = logp / in_response.sum(1).clamp_min(1).to(logp.dtype)
    return (logp, hidden) if return_hidden else logp
