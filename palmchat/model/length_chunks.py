"""Forward passes over right-padded rows of very different lengths, cut into chunks of similar length.

A batch of prompt + response rows is padded to its longest row, and every pad costs a full token of compute: in
the bundled rankings a batch is ~60% pads. Each row of a right-padded batch depends only on its own tokens (the
attention is causal and pads come after), so the rows can go through the model in several forwards, each cut to
its own longest row, and give the batch's results. :func:`length_chunks` picks the chunks: the rows sorted by length
and cut where the cost, each chunk's rows x its longest row plus a fixed cost per forward pass, is least.
TRL's ``padding_free`` and torchtune's packing remove the same waste by concatenating rows under a block-diagonal
attention mask; chunking needs nothing from the attention kernels, so every kernel path keeps working.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["FORWARD_COST_TOKENS", "length_chunks", "map_length_chunks"]

# what one more forward (and backward) pass costs beyond its tokens, in tokens: the per-call work of a small
# model's layers on a CPU (benchmarks/README.md)
FORWARD_COST_TOKENS = 256


def length_chunks(lengths: Tensor, max_rows: int | None = None,
                  forward_cost: int = FORWARD_COST_TOKENS) -> list[Tensor]:
    """Row indices (long tensors) grouped into chunks that together cost the fewest padded tokens, counting
    ``forward_cost`` tokens per chunk: a dynamic programme over the rows sorted by length (a chunk of sorted rows
    i..j-1 costs (j - i) x lengths[j-1] + forward_cost). ``max_rows`` caps the rows per chunk (memory).
    Every row is in exactly one chunk."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    n = len(lengths)
    lengths_cpu = lengths.cpu()
    order = torch.argsort(lengths_cpu, stable=True)
    sorted_lengths = lengths_cpu[order].tolist()
    # best[j]: the least cost of the first j sorted rows; cut[j]: where the last chunk of that best split starts
    best, cut = [0] * (n + 1), [0] * (n + 1)
    for j in range(1, n + 1):
        longest = sorted_lengths[j - 1]
        first = 0 if max_rows is None else max(0, j - max_rows)
        best[j], cut[j] = min((best[i] + (j - i) * longest + forward_cost, i) for i in range(first, j))
    chunks, j = [], n
    while j > 0:
        chunks.append(order[cut[j]:j])
        j = cut[j]
    return [c.to(lengths.device) for c in reversed(chunks)]


def map_length_chunks(fn: Callable[[Tensor, Tensor], Tensor], ids: Tensor, lengths: Tensor,
                      max_rows: int | None = None, forward_cost: int = FORWARD_COST_TOKENS) -> Tensor:
    """``fn(ids_chunk, rows)`` over :func:`length_chunks` of right-padded ``ids`` (N, T), each chunk cut to its
    longest row; ``fn`` returns one result per row of its chunk (a leading axis of len(rows)). Returns the results
    in the rows' original order (N, ...). Gradients flow through ``fn``'s results. ``max_rows`` and
    ``forward_cost``: as in :func:`length_chunks`."""
    parts, rows_in_order = [], []
    for rows in length_chunks(lengths, max_rows, forward_cost):
        parts.append(fn(ids[rows, :max(1, int(lengths[rows].max()))], rows))
        rows_in_order.append(rows)
    results, rows = torch.cat(parts), torch.cat(rows_in_order)
    return results[torch.argsort(rows)]
