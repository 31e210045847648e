"""Rotary position embeddings (RoFormer, Su et al. 2021, https://arxiv.org/abs/2104.09864), in the "rotate half"
layout of GPT-NeoX and Hugging Face's Llama, so such checkpoints load without permuting; linear scaling is position
interpolation (Chen et al. 2023, https://arxiv.org/abs/2306.15595); "llama3" is Llama 3.1's frequency-dependent
scaling (Hugging Face's `_compute_llama3_parameters`); `rotary_dim` < head_dim rotates only the first dims of each
head (GPT-NeoX's rotary_pct); Gemma 3's local layers have tables of their own. Shapes as in transformer.py."""

from __future__ import annotations

import math

import torch

from palmchat.model.config import ModelConfig


def inverse_frequencies(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """(rotary_dim / 2,) float64 angle per position of each rotated pair: theta^(-i / (rotary_dim / 2)).
    local: the tables of Gemma 3's sliding-window layers, with their own base and no scaling."""
    half = config.rotary_dim // 2
    theta = config.local_rope_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(half, dtype=torch.float64) / half))
    if config.rope_type == "llama3" and not local:
        # Llama 3.1: long wavelengths (low frequencies) are slowed by `rope_scaling`, short ones kept, and the band
        # between the two cut-offs interpolated smoothly
        factor, low, high = config.rope_scaling, config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_len
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        medium = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, medium))
    return inv_freq


def rotary_tables(config: ModelConfig, length: int, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The (length, rotary_dim) tables apply_rotary takes: [cos, cos] and [-sin, sin] of each position's angles.
    Built full width once, so that a decode step only indexes them. local: see inverse_frequencies."""
    positions = torch.arange(length, dtype=torch.float64)
    if config.rope_type == "linear" and not local:
        positions = positions / config.rope_scaling
    angles = torch.outer(positions, inverse_frequencies(config, local))  # (length, rotary_dim / 2)
    cos, sin = angles.cos().float(), angles.sin().float()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, D); cos, sin: (B or 1, 1, T, rotary_dim) rows of `rotary_tables`.

    Rotate-half rotation of x = [x1, x2]: [x1 cos - x2 sin, x2 cos + x1 sin], written as
    x * [cos, cos] + [x2, x1] * [-sin, sin]: four ops instead of eight (split, four products, two sums,
    concatenation), with bit-identical results. [x2, x1] is one flip of x seen as (..., 2, D/2) (a roll does the
    same in several internal ops). The op count matters for one-token decode steps.
    With rotary_dim < D only the first rotary_dim dims turn; the rest pass through (GPT-NeoX)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [x2, x1]
    return x * cos + swapped * sin


def rotary_qk(heads: torch.Tensor, rope, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """heads: (B, T, H + Hkv, D), queries then keys -> q (B, H, T, D), k (B, Hkv, T, D).
    Rotating queries and keys in one call halves the small ops per layer (they dominate decode steps)."""
    qk = apply_rotary(heads.transpose(1, 2), *rope)
    return qk.split((config.n_heads, config.n_kv_heads), dim=1)
