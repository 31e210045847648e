"""Causal attention for the decoder's blocks, picking the kernel: palmchat's C kernel for bf16 CPU training on
AMX (kernels/cpu_attention.py), SDPA or the blocked kernel (kernels/blocked_attention.py) elsewhere on CPUs, SDPA on
GPUs; with a KV cache, a padding mask or a sliding window shorter than the sequence, SDPA with an explicit mask.
Multi-query attention: Shazeer 2019, https://arxiv.org/abs/1911.02150; grouped-query attention: Ainslie et al.
2023, https://arxiv.org/abs/2305.13245.
Sliding-window attention (Mistral; Beltagy et al. 2020, https://arxiv.org/abs/2004.05150): a query at position p
sees the keys at positions p - window + 1 .. p (in Gemma 3 only in its local layers). Shapes as in transformer.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from palmchat.kernels import cpu_attention
from palmchat.kernels.blocked_attention import SDPA_IS_FASTER_ON_THIS_CPU, blocked_causal_attention
from palmchat.model.config import ModelConfig


def attention(q, k, v, config: ModelConfig, positions, cache, layer: int, padding_mask) -> torch.Tensor:
    """q: (B, H, T, D); k, v: (B, Hkv, T, D) -> (B, T, H*D)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    window = config.sliding_window if config.is_local(layer) else None
    if config.attn_scale is not None:  # every kernel below scales by D^-0.5: fold the difference into q (Gemma)
        q = q * (config.attn_scale * math.sqrt(D))
    if cache is None and padding_mask is None and (window is None or window >= T):
        # training path: a fused or blocked causal kernel, no (T, T) matrix in memory
        if q.device.type == "cpu":
            if cpu_attention.available(q):
                out = cpu_attention.causal_attention(q, k, v)
            elif SDPA_IS_FASTER_ON_THIS_CPU:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                out = blocked_causal_attention(q, k, v)
            return out.transpose(1, 2).reshape(B, T, H * D)
        if Hkv != H:
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(B, T, H * D)

    if cache is not None:
        k, v = cache.write(layer, k, v, positions)  # (B, Hkv, S, D): every cached key, this call's included
        if B == 1 and T == 1 and (window is None or k.shape[2] <= window):
            # one sequence, one new token: the cache returned exactly its keys 0..position, all visible
            out = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), k, v)  # (B, Hkv, G, D)
            return out.reshape(B, 1, H * D)
        query_positions = positions  # (B, T)
        key_positions = torch.arange(k.shape[2], device=q.device)  # (S,)
    else:
        key_positions = torch.arange(T, device=q.device)  # (T,)
        query_positions = key_positions[None]  # (1, T)
    # a query sees the keys at or before its own position (with a cache, nothing beyond a row's length is seen)
    visible = key_positions[None, None, :] <= query_positions[:, :, None]  # (B or 1, T, S)
    if window is not None:
        visible = visible & (key_positions[None, None, :] > query_positions[:, :, None] - window)
    if cache is None and padding_mask is not None:
        # pads are invisible as keys; a pad query sees itself only, so no row of the softmax is empty
        visible = (visible & padding_mask[:, None, :]) | torch.eye(T, dtype=torch.bool, device=q.device)

    # Fold the G query heads that share one K/V head into the query-length axis: K/V are never copied.
    G = H // Hkv
    q = q.reshape(B, Hkv, G * T, D)
    mask = visible[:, None, None].expand(B, 1, G, T, visible.shape[-1]).reshape(B, 1, G * T, -1)  # (B, 1, G*T, S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, Hkv, G*T, D)
    return out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
