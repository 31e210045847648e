"""The PaLM decoder, readable top to bottom.

PaLM: Scaling Language Modeling with Pathways, Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311

Notable features (each switchable in `ModelConfig`):
- parallel block: y = x + Attn(Norm(x)) + FF(Norm(x)) with one fused input projection (PaLM §2),
  or the sequential block y = h + FF(Norm(h)), h = x + Attn(Norm(x)) used by Llama/Qwen;
- multi-query attention (one K/V head shared by all query heads), grouped-query and multi-head as settings;
- rotary position embeddings with a configurable base and linear position interpolation;
- SwiGLU feed-forward; LayerNorm without bias or RMSNorm; no biases in any linear layer;
- tied or untied input/output embeddings;
- attention through F.scaled_dot_product_attention (CPU training in bf16 on AMX uses palmchat's C kernel of
  cpu_attention.py, and on a CPU without AMX the faster blocked kernel of blocked_attention.py): the training
  path never materialises a (T, T) score matrix;
- a KV-cache hook for incremental decoding (see palmchat/inference/kv_cache.py), and a padding mask
  so that left-padded batches get the right positions.

Shapes: B batch, T new tokens, S cached tokens, H query heads, G = H // n_kv_heads queries per K/V head,
D head dim, C model dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from palmchat.config import ModelConfig
from palmchat.model import cpu_attention
from palmchat.model.blocked_attention import SDPA_IS_FASTER_ON_THIS_CPU, blocked_causal_attention

# ---------------------------------------------------------------------------------------------
# Rotary position embedding. RoFormer, Su et al. 2021, https://arxiv.org/abs/2104.09864
# "rotate half" layout (GPT-NeoX, Llama in Hugging Face), so such checkpoints load without permuting.
# Linear scaling: position interpolation, Chen et al. 2023, https://arxiv.org/abs/2306.15595
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Norms. PaLM uses LayerNorm without bias (§2); Llama uses RMSNorm (Zhang & Sennrich 2019,
# https://arxiv.org/abs/1910.07467).
# ---------------------------------------------------------------------------------------------


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.dim, eps=config.norm_eps)
    return nn.LayerNorm(config.dim, eps=config.norm_eps, bias=False)


# ---------------------------------------------------------------------------------------------
# Attention. Multi-query attention: Shazeer 2019, https://arxiv.org/abs/1911.02150
# Grouped-query attention: Ainslie et al. 2023, https://arxiv.org/abs/2305.13245
# ---------------------------------------------------------------------------------------------


def attention(q, k, v, config: ModelConfig, positions, cache, layer: int, padding_mask) -> torch.Tensor:
    """q: (B, H, T, D); k, v: (B, Hkv, T, D) -> (B, T, H*D)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if cache is None and padding_mask is None:
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
        if B == 1 and T == 1:
            # one sequence, one new token: the cache returned exactly its keys 0..position, all visible
            out = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), k, v)  # (B, Hkv, G, D)
            return out.reshape(B, 1, H * D)
        key_positions = torch.arange(k.shape[2], device=q.device)
        # a query sees the keys at or before its own position; anything beyond a row's length is never seen
        visible = key_positions[None, None, :] <= positions[:, :, None]  # (B, T, S)
    else:
        key_positions = torch.arange(T, device=q.device)
        causal = key_positions[None, :] <= key_positions[:, None]  # (T, T)
        # pads are invisible as keys; a pad query sees itself only, so no row of the softmax is empty
        visible = (causal & padding_mask[:, None, :]) | torch.eye(T, dtype=torch.bool, device=q.device)

    # Fold the G query heads that share one K/V head into the query-length axis: K/V are never copied.
    G = H // Hkv
    q = q.reshape(B, Hkv, G * T, D)
    mask = visible[:, None, None].expand(B, 1, G, T, visible.shape[-1]).reshape(B, 1, G * T, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, Hkv, G*T, D)
    return out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU, Shazeer 2020, https://arxiv.org/abs/2002.05202 (PaLM §2)."""
    return F.silu(gate) * up


class ParallelBlock(nn.Module):
    """PaLM §2: attention and feed-forward read the same normed input and are summed into the residual.
    One fused projection computes q, k, v, and the SwiGLU gate and up projections at once."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, hd = config, config.head_dim
        self.splits = (c.n_heads * hd, c.n_kv_heads * hd, c.n_kv_heads * hd, c.ffn_hidden, c.ffn_hidden)
        self.qk_splits = (self.splits[0] + self.splits[1], *self.splits[2:])  # q and k side by side: one rotary call
        self.norm = make_norm(c)
        self.in_proj = nn.Linear(c.dim, sum(self.splits), bias=False)
        self.attn_out = nn.Linear(c.n_heads * hd, c.dim, bias=False)
        self.ff_out = nn.Linear(c.ffn_hidden, c.dim, bias=False)

    def forward(self, x, rope, positions, cache, layer, padding_mask):
        B, T, _ = x.shape
        c = self.config
        qk, v, gate, up = self.in_proj(self.norm(x)).split(self.qk_splits, dim=-1)
        q, k = rotary_qk(qk, rope, c)  # (B, H, T, D), (B, Hkv, T, D)
        v = v.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        a = attention(q, k, v, c, positions, cache, layer, padding_mask)  # (B, T, H*D)
        return x + self.attn_out(a) + self.ff_out(swiglu(gate, up))


class SequentialBlock(nn.Module):
    """The pre-norm sequential block of GPT-2/Llama: h = x + Attn(Norm(x)); y = h + FF(Norm(h))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, hd = config, config.head_dim
        self.qkv_splits = (c.n_heads * hd, c.n_kv_heads * hd, c.n_kv_heads * hd)
        self.qk_splits = (self.qkv_splits[0] + self.qkv_splits[1], self.qkv_splits[2])
        self.attn_norm = make_norm(c)
        self.qkv = nn.Linear(c.dim, sum(self.qkv_splits), bias=False)
        self.attn_out = nn.Linear(c.n_heads * hd, c.dim, bias=False)
        self.ff_norm = make_norm(c)
        self.gate_up = nn.Linear(c.dim, 2 * c.ffn_hidden, bias=False)
        self.ff_out = nn.Linear(c.ffn_hidden, c.dim, bias=False)

    def forward(self, x, rope, positions, cache, layer, padding_mask):
        B, T, _ = x.shape
        c = self.config
        qk, v = self.qkv(self.attn_norm(x)).split(self.qk_splits, dim=-1)
        q, k = rotary_qk(qk, rope, c)
        v = v.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        h = x + self.attn_out(attention(q, k, v, c, positions, cache, layer, padding_mask))
        gate, up = self.gate_up(self.ff_norm(h)).chunk(2, dim=-1)
        return h + self.ff_out(swiglu(gate, up))


class PaLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        Block = ParallelBlock if config.block == "parallel" else SequentialBlock
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rotary_tables(config, config.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, D)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norm weights
                nn.init.ones_(p)
            elif name.endswith(("attn_out.weight", "ff_out.weight")):
                # residual projections scaled down with depth (GPT-2, Radford et al. 2019)
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def hidden_states(self, idx: torch.Tensor, cache=None, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids -> (B, T, C) final normed hidden states.

        cache: a KVCache; the new tokens are written at each row's current length and the cache advances by T.
        padding_mask: (B, T) bool, True on real tokens; positions count real tokens only (left padding works).
        """
        B, T = idx.shape
        if cache is not None:
            positions = cache.lengths[:, None] + torch.arange(T, device=idx.device)  # (B, T)
        elif padding_mask is not None:
            positions = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            positions = None
        limit = T if positions is None else int(positions.max()) + 1
        if limit > self.config.max_seq_len:
            raise ValueError(f"sequence of {limit} tokens is longer than the model's context of "
                             f"{self.config.max_seq_len}")
        if positions is None:
            rope = self.rope_cos[None, None, :T], self.rope_sin[None, None, :T]  # (1, 1, T, D)
        else:
            rope = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, D)

        x = self.embed(idx)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, positions, cache, layer, padding_mask)
        if cache is not None:
            cache.lengths += T
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)  # (B, T, V)

    def forward(self, idx: torch.Tensor, cache=None, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(idx, cache=cache, padding_mask=padding_mask))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
