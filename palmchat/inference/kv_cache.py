"""A static KV cache: one preallocated slab per layer, one row per sequence, each row with its own length.

Rows are independent, so sequences of different lengths decode together, a row can be reset and
reused for a new request (continuous batching), and a stored prefix can be copied into a row
(prefix reuse) without touching the others.
"""

from __future__ import annotations

import torch

from palmchat.model.config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        max_len = max_len or config.max_seq_len
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, S_max, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) tokens held per row
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """k, v: (B, Hkv, T, D) for the tokens at `positions` (B, T), consecutive in each row (as the model
        passes them: lengths[:, None] + arange(T)).
        Returns every key and value up to the furthest written position: (B, Hkv, S, D)."""
        end = int(positions.max()) + 1
        if end > self.max_len:
            raise ValueError(f"KV cache full: position {end - 1} is past its {self.max_len} slots")
        B, _, T, _ = k.shape
        if B == 1:  # one row: its slots are end - T .. end - 1, a plain slice (the fewest ops per decode step)
            self.k[layer, :, :, end - T : end] = k
            self.v[layer, :, :, end - T : end] = v
        else:
            rows = torch.arange(B, device=k.device)[:, None]  # (B, 1), broadcast against positions (B, T)
            # Advanced indices on both sides of a slice put their dims first: the slots read as (B, T, Hkv, D).
            # (An index_put_: several times faster than scatter_ with an expanded index for decode steps.)
            self.k[layer][rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)
            self.v[layer][rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows start..stop-1 that shares this one's storage: what it writes lands here."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.lengths, view.max_len = self.lengths[start:stop], self.max_len
        return view

    def reset(self, rows: torch.Tensor | list[int] | None = None):
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, dtype=torch.long)] = 0

    def keep_rows(self, rows: torch.Tensor | list[int]):
        """Keep only these rows, in this order; the others are dropped (e.g. finished sequences of a batch)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.k, self.v, self.lengths = self.k[:, rows], self.v[:, rows], self.lengths[rows]
