"""Tiny random Hugging Face models saved as real folders (config.json + safetensors), built with `transformers`
from a config: no hub downloads. For the Hugging Face import/export tests, and for server and CLI tests that need
a Hugging Face folder.

    folder = save_tiny_hf_model(tmp_path / "qwen2", "qwen2")
    folder = save_tiny_hf_model(tmp_path / "neox", "gpt_neox", rotary_pct=0.25)   # overrides go to the config
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 160

# the tiny shape of each family (dims 32-64, 2 layers); overrides of save_tiny_hf_model win
TINY = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=False),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                    sliding_window=4, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=True),
    "qwen3": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  tie_word_embeddings=True),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, rotary_pct=0.25,
                     use_parallel_residual=True, tie_word_embeddings=False),
    "cohere": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1,
                   logit_scale=1.0, tie_word_embeddings=True),
    # one local (sliding-window) layer with its own rotary base, one global layer with linear rope scaling, and a
    # query_pre_attn_scalar that is not head_dim
    "gemma3_text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                        query_pre_attn_scalar=24,
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 10000.0}},
                        tie_word_embeddings=True),
}


def tiny_hf_config(family: str, **overrides):
    """The transformers config of a tiny `family` model (2 layers, vocabulary VOCAB, context 64)."""
    from transformers import AutoConfig

    fields = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, **TINY[family])
    fields.update(overrides)
    return AutoConfig.for_model(family, **fields)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that every tensor moves the logits well above the 1e-4 tolerance (transformers'
    0.02 init leaves near-uniform logits): matrices N(0, 0.15), norm weights 1 + N(0, 0.1), biases N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() > 1:
                p.copy_(0.15 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(1 + 0.1 * noise)
    return model


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers *ForCausalLM (fp32, eval mode, eager attention)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides), attn_implementation="eager")
    return randomize(model, seed).eval()


def save_tiny_hf_model(folder, family: str = "qwen2", seed: int = 0, dtype: torch.dtype | None = None,
                       max_shard_size: str | None = None, **overrides) -> Path:
    """Save a tiny random `family` model with save_pretrained (safetensors) into `folder`; returns the folder.
    overrides go to the transformers config (e.g. rotary_pct=0.5, sliding_window=3, tie_word_embeddings=False)."""
    model = tiny_hf_model(family, seed, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    return Path(folder)


__all__ = ["TINY", "VOCAB", "randomize", "save_tiny_hf_model", "tiny_hf_config", "tiny_hf_model"]
