"""The decoder, readable top to bottom: Transformer's design by default, Llama/Qwen-style blocks as settings.

PaLM: Scaling Language Modeling with Pathways, Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311

Notable features (each switchable in `ModelConfig`):
- parallel block: y = x + Attn(Norm(x)) + FF(Norm(x)) with one fused input projection (PaLM §2),
  or the sequential block y = h + FF(Norm(h)), h = x + Attn(Norm(x)) used by Llama/Qwen,
  or GPT-NeoX's parallel block with two norms, y = x + Attn(Norm1(x)) + FF(Norm2(x));
- multi-query attention (one K/V head shared by all query heads), grouped-query and multi-head as settings;
  optionally a sliding window (Mistral) and per-head RMSNorm on queries and keys (Qwen3);
- rotary position embeddings with a configurable base, linear or Llama 3.1 scaling and partial rotation (rope.py);
- SwiGLU feed-forward (or GELU for GPT-NeoX); LayerNorm without bias or RMSNorm; no biases in any linear layer
  (other families' biases are settings, and a bias a setting does not ask for is not created);
- tied or untied input/output embeddings;
- attention.py picks the kernel: F.scaled_dot_product_attention, palmchat's C kernel for bf16 CPU training on AMX,
  or the blocked kernel on a CPU without AMX; the training path never materialises a (T, T) score matrix;
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
from torch.utils.checkpoint import checkpoint

from palmchat.losses import linear_token_logprobs
from palmchat.model.attention import attention
from palmchat.model.config import ModelConfig
from palmchat.model.rope import rotary_qk, rotary_tables

# ---------------------------------------------------------------------------------------------
# Norms. PaLM uses LayerNorm without bias (§2); Llama uses RMSNorm (Zhang & Sennrich 2019,
# https://arxiv.org/abs/1910.07467); GPT-NeoX LayerNorm with a bias.
# ---------------------------------------------------------------------------------------------


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (offset + weight), computed in fp32 and cast back (its weights start at 0)."""

    def __init__(self, width: int, eps: float, offset: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (self.offset + self.weight.float())).type_as(x)


def make_norm(config: ModelConfig, width: int | None = None) -> nn.Module:
    width = width or config.dim
    if config.norm == "rmsnorm":
        if config.norm_offset:
            return OffsetRMSNorm(width, config.norm_eps, config.norm_offset)
        return nn.RMSNorm(width, eps=config.norm_eps)
    return nn.LayerNorm(width, eps=config.norm_eps, bias=config.norm_bias)


def head_norms(config: ModelConfig) -> tuple[nn.Module | None, nn.Module | None]:
    """Qwen3's (Gemma 3's) norms over each query head and each key head (weights shared across heads), or None."""
    if not config.qk_norm:
        return None, None
    return make_norm(config, config.head_dim), make_norm(config, config.head_dim)


def query_key_heads(qk: torch.Tensor, rope, config: ModelConfig, q_norm, k_norm) -> tuple[torch.Tensor, torch.Tensor]:
    """qk: (B, T, (H + Hkv) * D), queries then keys -> rotated q (B, H, T, D), k (B, Hkv, T, D)."""
    B, T, _ = qk.shape
    heads = qk.view(B, T, config.n_heads + config.n_kv_heads, config.head_dim)
    if q_norm is not None:  # Qwen3: each head's vector normed before rotary
        q, k = heads.split((config.n_heads, config.n_kv_heads), dim=2)
        heads = torch.cat((q_norm(q), k_norm(k)), dim=2)
    return rotary_qk(heads, rope, config)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU, Shazeer 2020, https://arxiv.org/abs/2002.05202 (PaLM §2)."""
    return F.silu(gate) * up


def feed_forward_activation(ff_in: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """The gated activations take [gate, up]: SwiGLU, or GeGLU with the tanh GELU (Gemma); the plain GELUs
    (Hendrycks & Gimpel 2016, https://arxiv.org/abs/1606.08415; exact or tanh) take one projection."""
    if config.ffn == "swiglu":
        return swiglu(*ff_in)
    if config.ffn == "geglu_tanh":
        gate, up = ff_in
        return F.gelu(gate, approximate="tanh") * up
    return F.gelu(ff_in[0], approximate="tanh" if config.ffn == "gelu_tanh" else "none")


def is_gated(config: ModelConfig) -> bool:
    return config.ffn in ("swiglu", "geglu_tanh")


class ParallelBlock(nn.Module):
    """PaLM §2: attention and feed-forward read the same normed input and are summed into the residual.
    One fused projection computes q, k, v, and the SwiGLU gate and up projections (or GELU's one) at once."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, hd = config, config.head_dim
        ff_in = (c.ffn_hidden, c.ffn_hidden) if is_gated(c) else (c.ffn_hidden,)
        self.splits = (c.n_heads * hd, c.n_kv_heads * hd, c.n_kv_heads * hd, *ff_in)
        self.qk_splits = (self.splits[0] + self.splits[1], *self.splits[2:])  # q and k side by side: one rotary call
        self.norm = make_norm(c)
        self.in_proj = nn.Linear(c.dim, sum(self.splits), bias=False)
        self.q_norm, self.k_norm = head_norms(c)
        self.attn_out = nn.Linear(c.n_heads * hd, c.dim, bias=False)
        self.ff_out = nn.Linear(c.ffn_hidden, c.dim, bias=False)

    def forward(self, x, rope, positions, cache, layer, padding_mask):
        B, T, _ = x.shape
        c = self.config
        qk, v, *ff_in = self.in_proj(self.norm(x)).split(self.qk_splits, dim=-1)
        q, k = query_key_heads(qk, rope, c, self.q_norm, self.k_norm)  # (B, H, T, D), (B, Hkv, T, D)
        v = v.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        a = attention(q, k, v, c, positions, cache, layer, padding_mask)  # (B, T, H*D)
        return x + self.attn_out(a) + self.ff_out(feed_forward_activation(ff_in, c))


class SequentialBlock(nn.Module):
    """The pre-norm sequential block of GPT-2/Llama: h = x + Attn(Norm(x)); y = h + FF(Norm(h)).
    With block="parallel" and parallel_norms=2 it is GPT-NeoX's parallel block instead: y = h + FF(Norm2(x)), the
    feed-forward reading the block's input through its own norm (the same modules, wired in parallel).
    With post_norms (Gemma 3's "sandwich"): h = x + PostNorm(Attn(Norm(x))); y = h + PostNorm2(FF(Norm2(h)))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, hd = config, config.head_dim
        self.parallel = c.block == "parallel"
        self.qkv_splits = (c.n_heads * hd, c.n_kv_heads * hd, c.n_kv_heads * hd)
        self.qk_splits = (self.qkv_splits[0] + self.qkv_splits[1], self.qkv_splits[2])
        self.attn_norm = make_norm(c)
        self.qkv = nn.Linear(c.dim, sum(self.qkv_splits), bias=c.qkv_bias)
        self.q_norm, self.k_norm = head_norms(c)
        self.attn_out = nn.Linear(c.n_heads * hd, c.dim, bias=c.attn_out_bias)
        self.attn_post_norm = make_norm(c) if c.post_norms else None
        self.ff_norm = make_norm(c)
        if is_gated(c):
            self.gate_up = nn.Linear(c.dim, 2 * c.ffn_hidden, bias=c.ffn_bias)
        else:
            self.ff_in = nn.Linear(c.dim, c.ffn_hidden, bias=c.ffn_bias)
        self.ff_out = nn.Linear(c.ffn_hidden, c.dim, bias=c.ffn_bias)
        self.ff_post_norm = make_norm(c) if c.post_norms else None

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        ff_in = self.gate_up(x).chunk(2, dim=-1) if is_gated(self.config) else [self.ff_in(x)]
        y = self.ff_out(feed_forward_activation(ff_in, self.config))
        return y if self.ff_post_norm is None else self.ff_post_norm(y)

    def forward(self, x, rope, positions, cache, layer, padding_mask):
        B, T, _ = x.shape
        c = self.config
        qk, v = self.qkv(self.attn_norm(x)).split(self.qk_splits, dim=-1)
        q, k = query_key_heads(qk, rope, c, self.q_norm, self.k_norm)
        v = v.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        a = self.attn_out(attention(q, k, v, c, positions, cache, layer, padding_mask))
        h = x + (a if self.attn_post_norm is None else self.attn_post_norm(a))
        return h + self.feed_forward(self.ff_norm(x if self.parallel else h))


class Transformer(nn.Module):
    """The decoder: token embedding, `n_layers` parallel (PaLM, GPT-NeoX) or sequential (Llama/Qwen) blocks, final
    norm and the output projection (tied to the embedding or not)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        one_norm_parallel = config.block == "parallel" and config.parallel_norms == 1
        Block = ParallelBlock if one_norm_parallel else SequentialBlock
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.build_rope_tables()
        # activation (gradient) checkpointing: training keeps one tensor per block and recomputes the rest in
        # backward, trading ~30% more compute for activation memory that no longer grows with depth
        self.gradient_checkpointing = False
        self.reset_parameters()

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
        """The model holding `state`'s tensors themselves, in their own dtype (a bf16 checkpoint stays bf16, a
        memory-mapped one is not copied): built on the meta device, so no initial weights are made either."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, assign=True, strict=True)
        with torch.device("cpu"):
            model.build_rope_tables()
        return model

    def build_rope_tables(self):
        """The rotary tables: buffers computed from the config, not weights, so checkpoints do not hold them (a
        model built on the meta device builds them again, for real, once its weights are in)."""
        config = self.config
        cos, sin = rotary_tables(config, config.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, rotary_dim)
        self.register_buffer("rope_sin", sin, persistent=False)
        if config.local_rope_theta is not None:  # Gemma 3's sliding-window layers rotate with a base of their own
            cos, sin = rotary_tables(config, config.max_seq_len, local=True)
            self.register_buffer("rope_local_cos", cos, persistent=False)
            self.register_buffer("rope_local_sin", sin, persistent=False)

    def reset_parameters(self):
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm weights: a scale of 1
                nn.init.constant_(p, 1.0 - self.config.norm_offset)
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
        rope = local_rope = self.rope_rows(self.rope_cos, self.rope_sin, T, positions)
        if self.config.local_rope_theta is not None:  # Gemma 3's sliding-window layers
            local_rope = self.rope_rows(self.rope_local_cos, self.rope_local_sin, T, positions)

        x = self.embed(idx)
        if self.config.embed_scale != 1.0:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)  # Gemma: rounded to the model's dtype
        recompute = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            layer_rope = local_rope if self.config.is_local(layer) else rope
            if recompute:  # keep only each block's input; its activations are recomputed in backward
                x = checkpoint(block, x, layer_rope, positions, cache, layer, padding_mask, use_reentrant=False)
            else:
                x = block(x, layer_rope, positions, cache, layer, padding_mask)
        if cache is not None:
            cache.lengths += T
        return self.norm(x)

    @staticmethod
    def rope_rows(cos: torch.Tensor, sin: torch.Tensor, T: int, positions: torch.Tensor | None):
        """The rows of the (max_seq_len, rotary_dim) tables for these tokens: (1, 1, T, D) or (B, 1, T, D)."""
        if positions is None:
            return cos[None, None, :T], sin[None, None, :T]
        return cos[positions][:, None], sin[positions][:, None]

    @property
    def output_weight(self) -> torch.Tensor:
        """The (V, C) matrix the output layer multiplies by: the tied embedding, or lm_head's weight."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.output_weight)  # (B, T, V)

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """(..., C) final hidden states and (...) target ids -> (...) float32 log-probs under logits / temperature
        (0 where a target is negative), as `logits` would give them but without the (..., V) logits
        (losses.linear_token_logprobs)."""
        return linear_token_logprobs(hidden, self.output_weight, targets, temperature)

    def forward(self, idx: torch.Tensor, cache=None, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(idx, cache=cache, padding_mask=padding_mask))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
