"""Rotary position embeddings (RoFormer, Su et al. 2021, https://arxiv.org/abs/2104.09864), in the "rotate half"
layout of GPT-NeoX and Hugging Face's Llama, so such checkpoints load without permuting; linear scaling is position
interpolation (Chen et al. 2023, https://arxiv.org/abs/2306.15595). Shapes as in transformer.py."""

from __future__ import annotations

import torch

from palmchat.model.config import ModelConfig


def rotary_tables(config: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (length, D) tables apply_rotary takes: [cos, cos] and [-sin, sin] of each position's angles.
    Built full width once, so that a decode step only indexes them."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(half, dtype=torch.float64) / half))
    positions = torch.arange(length, dtype=torch.float64) / config.rope_scaling
    angles = torch.outer(positions, inv_freq)  # (length, D/2)
    cos, sin = angles.cos().float(), angles.sin().float()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, D); cos, sin: (B or 1, 1, T, D) rows of `rotary_tables`.

    Rotate-half rotation of x = [x1, x2]: [x1 cos - x2 sin, x2 cos + x1 sin], written as
    x * [cos, cos] + [x2, x1] * [-sin, sin]: four ops instead of eight (split, four products, two sums,
    concatenation), with bit-identical results. [x2, x1] is one flip of x seen as (..., 2, D/2) (a roll does the
    same in several internal ops). The op count matters for one-token decode steps."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [x2, x1]
    return x * cos + swapped * sin


def rotary_qk(qk: torch.Tensor, rope, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """qk: (B, T, (H + Hkv) * D), queries then keys -> q (B, H, T, D), k (B, Hkv, T, D).
    Rotating queries and keys in one call halves the small ops per layer (they dominate decode steps)."""
    B, T, _ = qk.shape
    qk = apply_rotary(qk.view(B, T, config.n_heads + config.n_kv_heads, config.head_dim).transpose(1, 2), *rope)
    return qk.split((config.n_heads, config.n_kv_heads), dim=1)
