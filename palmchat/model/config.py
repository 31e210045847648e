"""Model configuration: one dataclass, a few named presets.

The same `ModelConfig` describes PaLM's parallel block and the sequential
(Llama-style) block, multi-query / grouped-query / multi-head attention and the
norm flavour, so public checkpoints of other families can later be loaded into
the same model code by mapping weight names.
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
        per_layer = self.dim * (q + 2 * kv) + q * self.dim + 3 * self.dim * self.ffn_hidden
        per_layer += self.dim * (1 if self.block == "parallel" else 2)
        n = self.n_layers * per_layer + self.dim
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
