"""Model configuration: one dataclass, a few named presets.

The same `ModelConfig` describes PaLM's parallel block and the sequential
(Llama-style) block, multi-query / grouped-query / multi-head attention and the
norm flavour. The settings after `init_std` are what other families' checkpoints
need (Llama 3.1 rope, Mistral's sliding window, Qwen's biases and q/k norms,
GPT-NeoX's two-norm parallel block, partial rotary and GELU, Gemma 3's offset and
sandwich norms, scaled embeddings and local layers): with their
defaults the model is exactly palmchat's own, so older checkpoints load unchanged.
palmchat/checkpoint/hf.py maps each family's config.json onto these fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 1  # 1 = multi-query attention as in PaLM; n_heads = multi-head; between = grouped-query
    head_dim: int | None = None  # default dim // n_heads
    ffn_hidden: int | None = None  # SwiGLU hidden size; default 4 * dim as in PaLM
    block: str = "parallel"  # "parallel" (PaLM, GPT-J/NeoX) or "sequential" (Llama, Qwen)
    norm: str = "layernorm"  # "layernorm" (PaLM: LayerNorm without bias) or "rmsnorm"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # linear position interpolation: positions are divided by this factor
    tie_embeddings: bool = True  # PaLM shares input and output embeddings
    max_seq_len: int = 512
    init_std: float = 0.02
    # -- settings for other families' checkpoints; the defaults are palmchat's own model --
    parallel_norms: int = 1  # parallel block: 1 norm shared by attention and FF (PaLM, Cohere), 2 (GPT-NeoX)
    ffn: str = "swiglu"  # gated "swiglu" or "geglu_tanh" (Gemma), or one-projection "gelu" (GPT-NeoX), "gelu_tanh"
    norm_bias: bool = False  # LayerNorm with a bias (GPT-NeoX)
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2, GPT-NeoX)
    attn_out_bias: bool = False  # a bias on the attention output projection (GPT-NeoX, Llama attention_bias)
    ffn_bias: bool = False  # biases on the feed-forward projections (GPT-NeoX, Llama mlp_bias)
    qk_norm: bool = False  # RMSNorm over each head's query and key before rotary (Qwen3)
    rotary_dim: int | None = None  # rotate only the first rotary_dim of each head (GPT-NeoX); default head_dim
    rope_type: str = "linear"  # "linear": positions / rope_scaling; "llama3": Llama 3.1's per-frequency scaling
    rope_low_freq_factor: float = 1.0  # llama3 only: wavelengths above original_max_len / this are scaled fully
    rope_high_freq_factor: float = 4.0  # llama3 only: wavelengths below original_max_len / this are kept
    rope_original_max_len: int = 8192  # llama3 only: the context the model was pretrained with
    sliding_window: int | None = None  # a query sees only the last `sliding_window` keys, its own included (Mistral)
    local_layers: list[int] | None = None  # the layers that use sliding_window (Gemma 3: 5 in 6); None: every layer
    local_rope_theta: float | None = None  # rotary base of the local layers, unscaled (Gemma 3); None: as the others
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight), in fp32 (Gemma: 1, weights start at 0)
    post_norms: bool = False  # the sequential block also norms each sublayer's output before adding it (Gemma 3)
    embed_scale: float = 1.0  # token embeddings are multiplied by this, in the model's dtype (Gemma: sqrt(dim))
    attn_scale: float | None = None  # attention logit scale; default head_dim ** -0.5 (Gemma: query_pre_attn_scalar)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"model config: {name}={getattr(self, name)!r} {why}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            bad("n_kv_heads", f"must divide n_heads={self.n_heads}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                bad("dim", f"must be divisible by n_heads={self.n_heads} (or set head_dim)")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            bad("head_dim", "must be even for rotary embeddings")
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.dim
        if self.block not in ("parallel", "sequential"):
            bad("block", 'must be "parallel" or "sequential"')
        if self.norm not in ("layernorm", "rmsnorm"):
            bad("norm", 'must be "layernorm" or "rmsnorm"')
        if self.rope_scaling <= 0:
            bad("rope_scaling", "must be > 0")
        if self.parallel_norms not in (1, 2):
            bad("parallel_norms", "must be 1 (PaLM) or 2 (GPT-NeoX)")
        if self.parallel_norms == 2 and self.block != "parallel":
            bad("parallel_norms", 'applies to block="parallel" only (the sequential block always has two norms)')
        if self.ffn not in ("swiglu", "geglu_tanh", "gelu", "gelu_tanh"):
            bad("ffn", 'must be "swiglu", "geglu_tanh", "gelu" or "gelu_tanh"')
        if self.norm_bias and self.norm != "layernorm":
            bad("norm_bias", 'needs norm="layernorm" (RMSNorm has no bias)')
        if self.block == "parallel" and self.parallel_norms == 1:
            for name in ("qkv_bias", "attn_out_bias", "ffn_bias"):
                if getattr(self, name):
                    bad(name, "is not supported by the fused one-norm parallel block (set parallel_norms=2)")
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if not isinstance(self.rotary_dim, int) or not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            bad("rotary_dim", f"must be an even integer in [2, head_dim={self.head_dim}]")
        if self.rope_type not in ("linear", "llama3"):
            bad("rope_type", 'must be "linear" or "llama3"')
        if self.rope_type == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            bad("rope_high_freq_factor", f"must be > rope_low_freq_factor={self.rope_low_freq_factor} > 0")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            bad("sliding_window", "must be a positive integer or None")
        if self.local_layers is not None:
            self.local_layers = [int(i) for i in self.local_layers]  # a list, also when given a tuple (JSON)
            if self.sliding_window is None or not all(0 <= i < self.n_layers for i in self.local_layers):
                bad("local_layers", f"must be layer indices below n_layers={self.n_layers}, with a sliding_window")
        if self.local_rope_theta is not None and self.local_layers is None:
            bad("local_rope_theta", "needs local_layers")
        if self.norm_offset and self.norm != "rmsnorm":
            bad("norm_offset", 'needs norm="rmsnorm"')
        if self.post_norms and self.block != "sequential":
            bad("post_norms", 'needs block="sequential"')
        if self.attn_scale is not None and self.attn_scale <= 0:
            bad("attn_scale", "must be > 0 or None")

    def is_local(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window (and rotates with local_rope_theta)."""
        return self.sliding_window is not None and (self.local_layers is None or layer in self.local_layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    def num_params(self, include_embedding: bool = True) -> int:
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        ff_in = (2 if self.ffn in ("swiglu", "geglu_tanh") else 1) * self.ffn_hidden
        per_layer = self.dim * (q + 2 * kv) + q * self.dim + self.dim * ff_in + self.ffn_hidden * self.dim
        if self.qkv_bias:
            per_layer += q + 2 * kv
        if self.attn_out_bias:
            per_layer += self.dim
        if self.ffn_bias:
            per_layer += ff_in + self.dim
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        norm_size = self.dim * (2 if self.norm_bias else 1)
        per_layer += norm_size * (1 if self.block == "parallel" and self.parallel_norms == 1 else 2)
        if self.post_norms:
            per_layer += 2 * norm_size
        n = self.n_layers * per_layer + norm_size
        if include_embedding:
            n += self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper appendix B:
        6N for the matmuls plus 12 * L * H * Q * T for attention (N excludes embeddings)."""
        n = self.num_params(include_embedding=False) + self.vocab_size * self.dim  # the output projection is a matmul
        return 6 * n + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


# Named presets. `vocab_size` is overwritten by the tokenizer at train time.
PRESETS: dict[str, dict] = {
    # for tests: builds and runs in milliseconds
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, max_seq_len=128),
    # the CPU demo: trains in minutes on 2 cores
    "mini": dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=1, max_seq_len=1024),
    # the shape of palm-rlhf-pytorch's enwik8 example (dim 512, depth 8, 8 heads of 64, multi-query)
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=1, max_seq_len=512),
    # a GPU-sized model (~110M parameters with a 32k vocabulary)
    "base": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=1, max_seq_len=2048),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


__all__ = ["ModelConfig", "PRESETS", "preset"]
