"""Hugging Face model folders in and out: config.json + safetensors <-> palmchat's Transformer, exactly.

A Hugging Face folder looks like::

    Qwen2.5-0.5B-Instruct/
      config.json                         {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], ...}
      model.safetensors                   or model.safetensors.index.json + model-00001-of-00002.safetensors ...
      generation_config.json, tokenizer.json, ...   (the tokenizer side is palmchat/tokenizer's)

Families loaded: Llama 1-3.x (incl. Llama 3.1 rope scaling), Mistral (sliding window), Qwen2/2.5, Qwen3, GPT-NeoX
(Pythia), Cohere and Gemma 3 (text). Each family's config.json maps onto `ModelConfig` fields (`hf_model_config`);
anything this code does not compute exactly (another model_type, a rope_type such as yarn, an activation,
quantization, Qwen's sliding-window layers, Gemma 2's soft-capping, ...) is refused by name, never loaded
approximately.

Weight names: one table per family (`NAME_TABLES`) maps each palmchat tensor to the Hugging Face tensors it is made
of, in order; fused palmchat projections (q/k/v, gate/up, PaLM's in_proj) are their parts concatenated along the
output dim. The same table reads (`native_state_dict`) and writes (`hf_state_dict`). Two families store rows in
another order, undone on the way in and redone on the way out (`LAYOUTS`): GPT-NeoX's fused query_key_value is per
head [q, k, v], and Cohere rotates interleaved pairs (x0, x1), (x2, x3) ... where palmchat rotates (x_i, x_i+D/2).

Nothing is unpickled: a folder with only pytorch_model.bin is refused. Tensors are read with safetensors.safe_open
and kept in their stored dtype unless a dtype is asked for; the model is built on the meta device and the read
tensors assigned to it, so a bf16 checkpoint never has an fp32 copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from palmchat.checkpoint.errors import CheckpointError
from palmchat.model.config import ModelConfig
from palmchat.model.transformer import Transformer
from palmchat.utils.atomic import atomic_folder

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "cohere": "CohereForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}
# what transformers assumes for a key that config.json omits, where it differs between families
FAMILY_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "mistral": dict(max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False, sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen3": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "gpt_neox": dict(max_position_embeddings=2048, layer_norm_eps=1e-5, tie_word_embeddings=False,
                     use_parallel_residual=True, attention_bias=True, hidden_act="gelu"),
    "cohere": dict(max_position_embeddings=8192, layer_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
                   logit_scale=0.0625),
    "gemma3_text": dict(max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True, head_dim=256,
                        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
                        rope_theta=1000000.0, rope_local_base_freq=10000.0),
}
REFUSED_FAMILIES = {
    "gemma": "Gemma 1 is not implemented (Gemma 3's text models, model_type gemma3_text, are)",
    "gemma2": "Gemma 2's attention and final-logit soft-capping are not implemented",
    "gemma3": "this is the multimodal Gemma 3; its text-only checkpoints (model_type gemma3_text) are supported",
}

# ---------------------------------------------------------------------------------------------
# Name tables: palmchat tensor -> the Hugging Face tensors it is made of, concatenated along dim 0.
# "{i}" is the layer, "{w}" weight or bias; entries for tensors a model does not have (biases, q/k norms,
# lm_head when tied) are skipped.
# ---------------------------------------------------------------------------------------------

_LLAMA_ATTENTION = {  # Llama, Mistral, Qwen2, Qwen3 (and Cohere's projections)
    "blocks.{i}.qkv.{w}": ("model.layers.{i}.self_attn.q_proj.{w}", "model.layers.{i}.self_attn.k_proj.{w}",
                           "model.layers.{i}.self_attn.v_proj.{w}"),
    "blocks.{i}.q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight",),
    "blocks.{i}.k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight",),
    "blocks.{i}.attn_out.{w}": ("model.layers.{i}.self_attn.o_proj.{w}",),
}
LLAMA_NAMES = {
    "embed.weight": ("model.embed_tokens.weight",),
    **_LLAMA_ATTENTION,
    "blocks.{i}.attn_norm.weight": ("model.layers.{i}.input_layernorm.weight",),
    "blocks.{i}.ff_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight",),
    "blocks.{i}.gate_up.{w}": ("model.layers.{i}.mlp.gate_proj.{w}", "model.layers.{i}.mlp.up_proj.{w}"),
    "blocks.{i}.ff_out.{w}": ("model.layers.{i}.mlp.down_proj.{w}",),
    "norm.weight": ("model.norm.weight",),
    "lm_head.weight": ("lm_head.weight",),
}
GPT_NEOX_NAMES = {
    "embed.weight": ("gpt_neox.embed_in.weight",),
    "blocks.{i}.attn_norm.{w}": ("gpt_neox.layers.{i}.input_layernorm.{w}",),
    "blocks.{i}.qkv.{w}": ("gpt_neox.layers.{i}.attention.query_key_value.{w}",),
    "blocks.{i}.attn_out.{w}": ("gpt_neox.layers.{i}.attention.dense.{w}",),
    "blocks.{i}.ff_norm.{w}": ("gpt_neox.layers.{i}.post_attention_layernorm.{w}",),
    "blocks.{i}.ff_in.{w}": ("gpt_neox.layers.{i}.mlp.dense_h_to_4h.{w}",),
    "blocks.{i}.ff_out.{w}": ("gpt_neox.layers.{i}.mlp.dense_4h_to_h.{w}",),
    "norm.{w}": ("gpt_neox.final_layer_norm.{w}",),
    "lm_head.weight": ("embed_out.weight",),
}
COHERE_NAMES = {  # PaLM's parallel block: one norm, q/k/v and gate/up fused into in_proj
    "embed.weight": ("model.embed_tokens.weight",),
    "blocks.{i}.norm.weight": ("model.layers.{i}.input_layernorm.weight",),
    "blocks.{i}.in_proj.weight": ("model.layers.{i}.self_attn.q_proj.weight",
                                  "model.layers.{i}.self_attn.k_proj.weight",
                                  "model.layers.{i}.self_attn.v_proj.weight",
                                  "model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    "blocks.{i}.attn_out.weight": ("model.layers.{i}.self_attn.o_proj.weight",),
    "blocks.{i}.ff_out.weight": ("model.layers.{i}.mlp.down_proj.weight",),
    "norm.weight": ("model.norm.weight",),
    "lm_head.weight": ("lm_head.weight",),
}
GEMMA3_NAMES = {  # Llama's names, but post_attention_layernorm is a post-norm, and the FF has a pre- and a post-norm
    "embed.weight": ("model.embed_tokens.weight",),
    **_LLAMA_ATTENTION,
    "blocks.{i}.attn_norm.weight": ("model.layers.{i}.input_layernorm.weight",),
    "blocks.{i}.attn_post_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight",),
    "blocks.{i}.ff_norm.weight": ("model.layers.{i}.pre_feedforward_layernorm.weight",),
    "blocks.{i}.gate_up.{w}": ("model.layers.{i}.mlp.gate_proj.{w}", "model.layers.{i}.mlp.up_proj.{w}"),
    "blocks.{i}.ff_out.{w}": ("model.layers.{i}.mlp.down_proj.{w}",),
    "blocks.{i}.ff_post_norm.weight": ("model.layers.{i}.post_feedforward_layernorm.weight",),
    "norm.weight": ("model.norm.weight",),
    "lm_head.weight": ("lm_head.weight",),
}
NAME_TABLES = {"llama": LLAMA_NAMES, "mistral": LLAMA_NAMES, "qwen2": LLAMA_NAMES, "qwen3": LLAMA_NAMES,
               "gpt_neox": GPT_NEOX_NAMES, "cohere": COHERE_NAMES, "gemma3_text": GEMMA3_NAMES}

# Hugging Face tensors whose rows are in another order than palmchat's (see the module docstring)
LAYOUTS = {
    "gpt_neox": {r"attention\.query_key_value\.": "heads_of_qkv"},
    "cohere": {r"self_attn\.[qk]_proj\.": "interleaved_rotary"},
}
# buffers some older checkpoints carry that are recomputed, not weights
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attention\.bias|\.attention\.masked_bias)$")


def row_layout(family: str, hf_name: str) -> str | None:
    return next((layout for pattern, layout in LAYOUTS.get(family, {}).items() if re.search(pattern, hf_name)), None)


def to_native_rows(t: torch.Tensor, layout: str | None, cfg: ModelConfig) -> torch.Tensor:
    rest = t.shape[1:]
    if layout == "heads_of_qkv":  # (H, 3, D) rows -> (3, H, D): all queries, then all keys, then all values
        return t.reshape(-1, 3, cfg.head_dim, *rest).transpose(0, 1).reshape(t.shape)
    if layout == "interleaved_rotary":  # per head, pairs (x0, x1), (x2, x3), ... -> x0, x2, ..., x1, x3, ...
        return t.reshape(-1, cfg.head_dim // 2, 2, *rest).transpose(1, 2).reshape(t.shape)
    return t


def to_hf_rows(t: torch.Tensor, layout: str | None, cfg: ModelConfig) -> torch.Tensor:
    rest = t.shape[1:]
    if layout == "heads_of_qkv":
        return t.reshape(3, -1, cfg.head_dim, *rest).transpose(0, 1).reshape(t.shape)
    if layout == "interleaved_rotary":
        return t.reshape(-1, 2, cfg.head_dim // 2, *rest).transpose(1, 2).reshape(t.shape)
    return t


def name_map(family: str, cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Every palmchat tensor of a model with config `cfg` -> the Hugging Face tensors it is made of, in order."""
    shapes = native_shapes(cfg)
    names = {}
    for native, parts in NAME_TABLES[family].items():
        for i in range(cfg.n_layers) if "{i}" in native else [None]:
            for w in ("weight", "bias") if "{w}" in native else [None]:
                key = native.format(i=i, w=w)
                if key in shapes:
                    names[key] = tuple(p.format(i=i, w=w) for p in parts)
    missing = sorted(set(shapes) - set(names))
    if missing:
        raise CheckpointError(f"{family}: palmchat tensor(s) {', '.join(missing[:3])} have no {family} name "
                              f"(the model has a feature that family does not)")
    return names


def native_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """The shape of every tensor of a Transformer(cfg), from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in Transformer(cfg).state_dict().items()}


def part_rows(native: str, cfg: ModelConfig, rows: int, n_parts: int) -> list[int]:
    """Rows of each Hugging Face part of palmchat's tensor `native` (which has `rows` rows)."""
    if n_parts == 1:
        return [rows]
    q, kv, ff = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_hidden
    return {"qkv": [q, kv, kv], "gate_up": [ff, ff], "in_proj": [q, kv, kv, ff, ff]}[native.split(".")[-2]]


def native_state_dict(hf_tensors: dict[str, torch.Tensor], family: str, cfg: ModelConfig,
                      source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Hugging Face tensors (names as in the checkpoint) -> palmchat's state dict for Transformer(cfg).
    Missing, unexpected and mis-shaped tensors are CheckpointErrors naming the tensor (and both shapes)."""
    shapes = native_shapes(cfg)
    used, out = set(), {}
    for native, parts in name_map(family, cfg).items():
        shape = shapes[native]
        tensors = []
        for name, rows in zip(parts, part_rows(native, cfg, shape[0], len(parts))):
            if name not in hf_tensors:
                raise CheckpointError(f"{source}: missing tensor {name!r} (for palmchat's {native})")
            t = hf_tensors[name]
            if t.shape != (rows, *shape[1:]):
                raise CheckpointError(f"{source}: shape mismatch for {name}: {tuple(t.shape)} in the checkpoint, "
                                      f"{(rows, *shape[1:])} from config.json (palmchat's {native})")
            tensors.append(to_native_rows(t, row_layout(family, name), cfg))
            used.add(name)
        out[native] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
    for name in sorted(set(hf_tensors) - used):
        tied_head = cfg.tie_embeddings and name in NAME_TABLES[family]["lm_head.weight"]
        if not tied_head and not IGNORED.search(name):
            raise CheckpointError(f"{source}: unexpected tensor {name!r} of shape {tuple(hf_tensors[name].shape)} "
                                  f"(not part of a {family} model with this config.json)")
    return out


def hf_state_dict(model_or_state_dict, family: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """palmchat's state dict (or a Transformer) -> the Hugging Face tensors of `family`, fused tensors split."""
    state = model_or_state_dict
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    names = name_map(family, cfg)
    out = {}
    for native, t in state.items():
        if native not in names:
            lora = " (a LoRA layer: merge the adapter first, palmchat.model.lora.merge_lora)" if (
                "lora" in native or ".base." in native) else ""
            raise CheckpointError(f"{family}: palmchat tensor {native!r} has no {family} name{lora}")
        parts = names[native]
        pieces = t.split(part_rows(native, cfg, t.shape[0], len(parts)), dim=0)
        for name, piece in zip(parts, pieces):
            out[name] = to_hf_rows(piece, row_layout(family, name), cfg).detach().contiguous().cpu()
    return out


# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------


def _rope(hf: dict, source: str) -> dict:
    """The ModelConfig rope fields from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x)."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = dict(hf.get(field) or {})
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    out = dict(rope_theta=float(theta))
    if rope_type == "default":
        return out
    if rope_type == "linear":
        return {**out, "rope_scaling": float(params["factor"])}
    if rope_type == "llama3":
        try:
            return {**out, "rope_type": "llama3", "rope_scaling": float(params["factor"]),
                    "rope_low_freq_factor": float(params["low_freq_factor"]),
                    "rope_high_freq_factor": float(params["high_freq_factor"]),
                    "rope_original_max_len": int(params["original_max_position_embeddings"])}
        except KeyError as e:
            raise CheckpointError(f"{source}: {field} of rope_type 'llama3' lacks {e.args[0]!r}") from None
    raise CheckpointError(f"{source}: {field}.rope_type {rope_type!r} is not supported (supported: linear, llama3)")


def _gemma3(hf: dict, source: str) -> dict:
    """Gemma 3 (text): offset RMSNorms before and after each sublayer, q/k norms, GeGLU, embeddings scaled by
    sqrt(dim), a query_pre_attn_scalar, and local sliding-window layers with their own rotary base."""
    def refuse(field, why):
        raise CheckpointError(f"{source}: {field} {why}")

    act = hf["hidden_activation"]
    if act != "gelu_pytorch_tanh":
        refuse(f"hidden_activation {act!r}", "is not supported (supported: gelu_pytorch_tanh)")
    for field in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(field) is not None:
            refuse(field, "is set: soft-capping is not supported")
    if hf.get("use_bidirectional_attention"):
        refuse("use_bidirectional_attention", "is true: only causal attention is supported")
    layer_types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
        for i in range(hf["num_hidden_layers"])]
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown or len(layer_types) != hf["num_hidden_layers"]:
        refuse("layer_types", f"must name sliding_attention or full_attention for each of the "
                              f"{hf['num_hidden_layers']} layers")
    rope = hf.get("rope_parameters") or {}
    if "full_attention" in rope:  # transformers 5: one rope_parameters per layer type
        global_rope = _rope({"rope_parameters": rope["full_attention"]}, source)
        local_rope = _rope({"rope_parameters": rope.get("sliding_attention") or {}}, source)
        local_theta = rope.get("sliding_attention", {}).get("rope_theta", hf["rope_local_base_freq"])
    else:  # 4.x: rope_theta and rope_scaling are the global layers', rope_local_base_freq the local ones'
        global_rope = _rope(hf, source)
        local_rope, local_theta = {}, hf["rope_local_base_freq"]
    if set(local_rope) - {"rope_theta"}:
        refuse("rope_parameters.sliding_attention", "must be the default rope (no scaling)")
    attention_bias = bool(hf.get("attention_bias", False))
    return dict(block="sequential", norm="rmsnorm", norm_eps=hf["rms_norm_eps"], norm_offset=1.0, post_norms=True,
                qk_norm=True, ffn="geglu_tanh", embed_scale=hf["hidden_size"] ** 0.5,
                attn_scale=hf["query_pre_attn_scalar"] ** -0.5, sliding_window=hf["sliding_window"],
                local_layers=[i for i, t in enumerate(layer_types) if t == "sliding_attention"],
                local_rope_theta=float(local_theta), qkv_bias=attention_bias, attn_out_bias=attention_bias,
                tie_embeddings=hf["tie_word_embeddings"], **global_rope)


def hf_model_config(hf_config: dict, source: str = "config.json") -> ModelConfig:
    """A Hugging Face config.json (as a dict) -> the ModelConfig computing exactly the same model, or a
    CheckpointError naming `source` and the field that this code does not implement."""
    def refuse(field, why):
        raise CheckpointError(f"{source}: {field} {why}")

    family = hf_config.get("model_type")
    if family in REFUSED_FAMILIES:
        refuse(f"model_type {family!r}", f"is not supported: {REFUSED_FAMILIES[family]}")
    if family not in ARCHITECTURES:
        refuse(f"model_type {family!r}", f"is not supported (supported: {', '.join(ARCHITECTURES)})")
    hf = {**FAMILY_DEFAULTS[family], **hf_config}
    if hf.get("quantization_config"):
        refuse("quantization_config", "is set: quantized checkpoints are not supported (use unquantized weights)")
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(hf.get(field), int):
            refuse(field, f"must be an integer, got {hf.get(field)!r}")
    n_heads = hf["num_attention_heads"]
    fields = dict(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                  n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                  head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, ffn_hidden=hf["intermediate_size"],
                  max_seq_len=hf["max_position_embeddings"], **_rope(hf, source))
    act = hf.get("hidden_act", "silu")

    if family in ("llama", "mistral", "qwen2", "qwen3"):
        if act != "silu":
            refuse(f"hidden_act {act!r}", "is not supported for this family (supported: silu)")
        fields.update(block="sequential", norm="rmsnorm", norm_eps=hf["rms_norm_eps"],
                      tie_embeddings=hf["tie_word_embeddings"])
        attention_bias = bool(hf.get("attention_bias", False))
        fields.update(qkv_bias=attention_bias, attn_out_bias=attention_bias, ffn_bias=bool(hf.get("mlp_bias", False)))
        if family in ("qwen2", "qwen3"):
            if hf.get("use_sliding_window"):
                refuse("use_sliding_window", "is true: Qwen's per-layer sliding windows are not supported")
            if any(t != "full_attention" for t in hf.get("layer_types") or []):
                refuse("layer_types", "has layers other than full_attention: not supported")
        if family == "qwen2":  # biases on q, k, v only (whatever attention_bias says)
            fields.update(qkv_bias=True, attn_out_bias=False, ffn_bias=False)
        if family == "qwen3":
            fields.update(qk_norm=True)
        if family == "mistral":
            fields.update(sliding_window=hf["sliding_window"])
            if hf.get("layer_types"):
                refuse("layer_types", "is set: Mistral with per-layer attention types is not supported")
    elif family == "gpt_neox":
        tanh_approximations = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # one formula, three spellings
        if act != "gelu" and act not in tanh_approximations:
            refuse(f"hidden_act {act!r}", f"is not supported (supported: gelu, {', '.join(tanh_approximations)})")
        rope = hf.get("rope_parameters") or {}
        rotary_pct = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
        head_dim = hf["hidden_size"] // n_heads
        rotary_dim = int(head_dim * rotary_pct)
        if rotary_dim % 2 or rotary_dim < 2:
            refuse(f"rotary_pct {rotary_pct}", f"gives an odd or empty rotary dim {rotary_dim} of head_dim {head_dim}")
        parallel = hf["use_parallel_residual"]
        attention_bias = bool(hf["attention_bias"])
        fields.update(n_kv_heads=n_heads, head_dim=head_dim, rotary_dim=rotary_dim,
                      block="parallel" if parallel else "sequential", parallel_norms=2 if parallel else 1,
                      norm="layernorm", norm_bias=True, norm_eps=hf["layer_norm_eps"],
                      ffn="gelu" if act == "gelu" else "gelu_tanh", qkv_bias=attention_bias,
                      attn_out_bias=attention_bias, ffn_bias=True, tie_embeddings=hf["tie_word_embeddings"])
    elif family == "cohere":
        if act != "silu":
            refuse(f"hidden_act {act!r}", "is not supported (supported: silu)")
        if hf["logit_scale"] != 1.0:
            refuse(f"logit_scale {hf['logit_scale']}", "is not supported (only 1.0)")
        if hf.get("use_qk_norm"):
            refuse("use_qk_norm", "is true: Cohere's LayerNorm q/k norms are not supported")
        if hf.get("attention_bias"):
            refuse("attention_bias", "is true: not supported for Cohere's fused parallel block")
        fields.update(block="parallel", norm="layernorm", norm_eps=hf["layer_norm_eps"],
                      tie_embeddings=hf["tie_word_embeddings"])
    elif family == "gemma3_text":
        fields.update(_gemma3(hf, source))
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Reading a folder
# ---------------------------------------------------------------------------------------------


def is_hf_model_folder(path: str | os.PathLike) -> bool:
    """A Hugging Face model folder: config.json naming a model_type or architectures, with safetensors weights
    (not a palmchat checkpoint, whose config.json has a "model" entry)."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and "model" not in config
            and ("model_type" in config or "architectures" in config)
            and ((path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file()))


def read_hf_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a Hugging Face model folder needs config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or "model" in config:
        raise CheckpointError(f"{path}: not a Hugging Face config.json (a palmchat checkpoint? use load_model)")
    return config


def weight_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it: model.safetensors, or the shards an index names."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        index_path = folder / INDEX_FILE
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index_path}: not a safetensors index (needs a 'weight_map')") from None
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointError(f"{index_path}: weight_map names shard {shard!r}, which is missing")
        return {name: folder / shard for name, shard in weight_map.items()}
    if (folder / WEIGHTS_FILE).is_file():
        with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
            return {name: folder / WEIGHTS_FILE for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    if pickles:
        raise CheckpointError(f"{folder}: only pickle weights ({', '.join(pickles[:3])}): convert to safetensors; "
                              f"palmchat never unpickles")
    raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def read_tensors(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, read through safe_open (memory-mapped), in its stored dtype
    or converted one tensor at a time to `dtype`."""
    by_file: dict[Path, list[str]] = {}
    for name, path in weight_files(folder).items():
        by_file.setdefault(path, []).append(name)
    tensors = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            available = set(f.keys())
            for name in names:
                if name not in available:
                    raise CheckpointError(f"{Path(folder) / INDEX_FILE}: names tensor {name!r} in {path.name}, "
                                          f"which does not hold it")
                t = f.get_tensor(name)
                tensors[name] = t if dtype is None else t.to(dtype)
    return tensors


def _family_of(hf_config: dict, source: str, heads: tuple[str, ...]) -> str:
    family = hf_config.get("model_type")
    if family not in ARCHITECTURES:
        hf_model_config(hf_config, source)  # refuses the unknown family by name
    for arch in hf_config.get("architectures") or []:
        if not arch.endswith(heads):
            raise CheckpointError(f"{source}: architectures {arch!r} is not supported here (expected a "
                                  f"{' or '.join(heads)} of model_type {family!r})")
    return family


def load_hf_model(folder: str | os.PathLike, dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """A Hugging Face *ForCausalLM folder -> (Transformer computing the same logits, info).
    info: {"family": model_type, "hf_config": the config.json dict, "generation_config": generation_config.json
    ({} without one; its eos_token_id is what ends a turn), "source": folder}."""
    folder = Path(folder)
    hf_config = read_hf_config(folder)
    source = str(folder / CONFIG_FILE)
    family = _family_of(hf_config, source, ("ForCausalLM",))
    cfg = hf_model_config(hf_config, source)
    state = native_state_dict(read_tensors(folder, dtype), family, cfg, source=str(folder))
    info = {"family": family, "hf_config": hf_config, "generation_config": read_generation_config(folder),
            "source": str(folder)}
    return Transformer.from_state_dict(cfg, state).to(device), info


def read_generation_config(folder: str | os.PathLike) -> dict:
    """generation_config.json of a Hugging Face folder as a dict; {} when there is none."""
    path = Path(folder) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: must be a JSON object")
    return config


def load_hf_reward_backbone(folder: str | os.PathLike, dtype: torch.dtype | None = None,
                            device: str | torch.device = "cpu") -> tuple[Transformer, torch.Tensor, dict]:
    """A Hugging Face *ForSequenceClassification folder with one label -> (backbone, score weight (1, dim), info).
    The reward is score_weight @ the final hidden state of the last real token; the backbone's own output
    projection is unused (built tied to the embedding, so it costs nothing)."""
    folder = Path(folder)
    hf_config = read_hf_config(folder)
    source = str(folder / CONFIG_FILE)
    family = _family_of(hf_config, source, ("ForSequenceClassification",))
    num_labels = hf_config.get("num_labels", len(hf_config.get("id2label") or {0: None, 1: None}))
    if num_labels != 1:
        raise CheckpointError(f"{source}: num_labels {num_labels}: a reward model has one (a scalar score)")
    cfg = hf_model_config({**hf_config, "tie_word_embeddings": True}, source)
    tensors = read_tensors(folder, dtype)
    if "score.bias" in tensors:
        raise CheckpointError(f"{folder}: tensor 'score.bias': a score head with a bias is not supported")
    if "score.weight" not in tensors:
        raise CheckpointError(f"{folder}: missing tensor 'score.weight' (the sequence-classification head)")
    score = tensors.pop("score.weight")
    if tuple(score.shape) != (1, cfg.dim):
        raise CheckpointError(f"{folder}: shape mismatch for score.weight {tuple(score.shape)}: needs (1, {cfg.dim})")
    state = native_state_dict(tensors, family, cfg, source=str(folder))
    info = {"family": family, "hf_config": hf_config, "source": str(folder)}
    return Transformer.from_state_dict(cfg, state).to(device), score.to(device), info


# ---------------------------------------------------------------------------------------------
# Writing a folder
# ---------------------------------------------------------------------------------------------


def hf_family_for(cfg: ModelConfig) -> str:
    """The Hugging Face family that computes exactly what a model with `cfg` computes, or a CheckpointError
    saying why none does."""
    full_rotary = cfg.rotary_dim == cfg.head_dim
    gemma = (cfg.norm_offset, cfg.post_norms, cfg.embed_scale, cfg.attn_scale, cfg.local_layers,
             cfg.local_rope_theta) != (0.0, False, 1.0, None, None, None)
    if gemma:
        if (cfg.block == "sequential" and cfg.norm == "rmsnorm" and cfg.norm_offset == 1.0 and cfg.post_norms
                and cfg.qk_norm and cfg.ffn == "geglu_tanh" and cfg.embed_scale == cfg.dim ** 0.5 and full_rotary
                and cfg.sliding_window is not None and cfg.qkv_bias == cfg.attn_out_bias and not cfg.ffn_bias):
            return "gemma3_text"
        raise CheckpointError("Gemma's settings (norm_offset, post_norms, embed_scale, attn_scale, local layers) "
                              "export only as Gemma 3, which needs them all: offset 1 RMSNorms, post-norms, q/k "
                              "norms, GeGLU, embed_scale sqrt(dim), a sliding window, full rotary, no MLP biases")
    if cfg.block == "parallel" and cfg.parallel_norms == 1:
        if cfg.ffn == "swiglu" and cfg.norm == "layernorm" and not cfg.qk_norm and cfg.sliding_window is None \
                and full_rotary:
            return "cohere"
        raise CheckpointError("no Hugging Face family has this one-norm parallel block (Cohere's needs LayerNorm "
                              "without bias, SwiGLU, full rotary, no q/k norm and no sliding window)")
    if cfg.norm == "layernorm" or cfg.ffn != "swiglu" or cfg.parallel_norms == 2:
        if (cfg.norm == "layernorm" and cfg.norm_bias and cfg.ffn != "swiglu" and cfg.n_kv_heads == cfg.n_heads
                and cfg.qkv_bias == cfg.attn_out_bias and cfg.ffn_bias and not cfg.qk_norm
                and cfg.sliding_window is None and cfg.head_dim * cfg.n_heads == cfg.dim):
            return "gpt_neox"
        raise CheckpointError("no Hugging Face family has this block: LayerNorm or GELU blocks export as GPT-NeoX, "
                              "which needs LayerNorm with bias, GELU, multi-head attention and biases on every "
                              "linear")
    if not full_rotary:
        raise CheckpointError("no Hugging Face family has partial rotary with RMSNorm and SwiGLU")
    if cfg.qk_norm:
        if cfg.sliding_window is None and cfg.qkv_bias == cfg.attn_out_bias and not cfg.ffn_bias:
            return "qwen3"
        raise CheckpointError("q/k norms export as Qwen3, which has no sliding window, no MLP biases, and biases "
                              "on all of q, k, v and o or none")
    if cfg.sliding_window is not None:
        if not (cfg.qkv_bias or cfg.attn_out_bias or cfg.ffn_bias):
            return "mistral"
        raise CheckpointError("a sliding window exports as Mistral, which has no biases")
    if cfg.qkv_bias and not cfg.attn_out_bias and not cfg.ffn_bias:
        return "qwen2"
    if cfg.qkv_bias == cfg.attn_out_bias:
        return "llama"
    raise CheckpointError("no Hugging Face family has biases on the attention output only")


def _rope_config(cfg: ModelConfig) -> dict:
    scaling = None
    if cfg.rope_type == "llama3":
        scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling, "low_freq_factor": cfg.rope_low_freq_factor,
                   "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_len}
    elif cfg.rope_scaling != 1.0:
        scaling = {"rope_type": "linear", "factor": cfg.rope_scaling}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling}


def hf_config_for(cfg: ModelConfig, family: str) -> dict:
    """The config.json of `family` describing the model `cfg` describes."""
    common = dict(architectures=[ARCHITECTURES[family]], model_type=family, vocab_size=cfg.vocab_size,
                  hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
                  tie_word_embeddings=cfg.tie_embeddings, **_rope_config(cfg))
    if family == "gpt_neox":
        return {**common, "hidden_act": "gelu" if cfg.ffn == "gelu" else "gelu_pytorch_tanh",
                "rotary_pct": cfg.rotary_dim / cfg.head_dim, "rotary_emb_base": cfg.rope_theta,
                "use_parallel_residual": cfg.block == "parallel", "layer_norm_eps": cfg.norm_eps,
                "attention_bias": cfg.qkv_bias}
    common.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu")
    if family == "cohere":
        if cfg.head_dim * cfg.n_heads != cfg.dim:
            raise CheckpointError(f"cohere: head_dim {cfg.head_dim} * n_heads {cfg.n_heads} must equal dim {cfg.dim}")
        return {**common, "layer_norm_eps": cfg.norm_eps, "logit_scale": 1.0, "use_qk_norm": False,
                "attention_bias": False}
    common.update(rms_norm_eps=cfg.norm_eps)
    if family == "gemma3_text":
        scalar = (cfg.attn_scale or cfg.head_dim ** -0.5) ** -2
        if abs(scalar - round(scalar)) > 1e-6:
            raise CheckpointError(f"gemma3_text: attn_scale {cfg.attn_scale} is not query_pre_attn_scalar ** -0.5 "
                                  f"for an integer query_pre_attn_scalar")
        local = range(cfg.n_layers) if cfg.local_layers is None else cfg.local_layers
        del common["hidden_act"]
        return {**common, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": round(scalar),
                "sliding_window": cfg.sliding_window, "rope_local_base_freq": cfg.local_rope_theta or cfg.rope_theta,
                "layer_types": ["sliding_attention" if i in local else "full_attention" for i in range(cfg.n_layers)],
                "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": cfg.qkv_bias}
    if family == "llama":
        return {**common, "attention_bias": cfg.qkv_bias, "mlp_bias": cfg.ffn_bias}
    if family == "mistral":
        return {**common, "sliding_window": cfg.sliding_window}
    if family == "qwen2":
        return {**common, "use_sliding_window": False}
    return {**common, "attention_bias": cfg.qkv_bias, "use_sliding_window": False}  # qwen3


def export_hf(model: Transformer, out_dir: str | os.PathLike, family: str | None = None,
              extra_config: dict | None = None, max_shard_bytes: int = 4 << 30, tokenizer=None) -> Path:
    """Write `model` as a Hugging Face folder that AutoModelForCausalLM.from_pretrained loads with the same
    logits: config.json, model.safetensors (or shards + index above max_shard_bytes) and, when extra_config
    names eos_token_id / bos_token_id, generation_config.json. family: the model's own (from load_hf_model's
    info) or None for the one hf_family_for picks (a native sequential model: llama; a native PaLM block: cohere).
    tokenizer: written beside the weights (its save_pretrained: files AutoTokenizer reads, chat template included),
    and its bos, end-of-turn and pad ids fill in what extra_config does not give.
    Written atomically: a crash leaves no half folder."""
    cfg = model.config
    if tokenizer is not None:
        chat_format = tokenizer.chat_format
        extra_config = {"bos_token_id": chat_format.bos_id, "pad_token_id": chat_format.pad_id,
                        "eos_token_id": list(chat_format.reply_stop_ids),  # every id that ends a reply
                        **(extra_config or {})}
    family = family or hf_family_for(cfg)
    if family not in ARCHITECTURES:
        raise CheckpointError(f"cannot export as {family!r} (supported: {', '.join(ARCHITECTURES)})")
    tensors = hf_state_dict(model, family, cfg)
    dtypes = {t.dtype for t in tensors.values()}
    # special token ids are the tokenizer's: unset unless extra_config names them (a family's defaults, such as
    # Cohere's eos 255001, would point outside this vocabulary)
    token_ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    config = {**hf_config_for(cfg, family), "torch_dtype": str(next(iter(dtypes))).removeprefix("torch."),
              **token_ids, **(extra_config or {})}
    # the export is exact only if reading its config.json back gives this very model
    described = hf_model_config(config, f"{family} export")
    differ = [f"{f.name}={getattr(cfg, f.name)!r} (as {family}: {getattr(described, f.name)!r})"
              for f in dataclasses.fields(ModelConfig) if f.name != "init_std"
              and getattr(described, f.name) != getattr(cfg, f.name)]
    if differ:
        raise CheckpointError(f"cannot export as {family}: its config.json cannot say {', '.join(differ)}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out_dir) as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        generation = {k: config[k] for k in token_ids if config[k] is not None}
        if generation and (tmp / GENERATION_CONFIG_FILE).is_file():  # the tokenizer's: keep its other settings
            generation = {**json.loads((tmp / GENERATION_CONFIG_FILE).read_text(encoding="utf-8")), **generation}
        if generation:
            (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        shards, size = [{}], 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], tmp / WEIGHTS_FILE, metadata=metadata)
        else:
            weight_map = {}
            for k, shard in enumerate(shards, 1):
                shard_name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / shard_name, metadata=metadata)
                weight_map.update(dict.fromkeys(shard, shard_name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return out_dir


__all__ = ["ARCHITECTURES", "NAME_TABLES", "export_hf", "hf_config_for", "hf_family_for", "hf_model_config",
           "hf_state_dict", "is_hf_model_folder", "load_hf_model", "load_hf_reward_backbone", "name_map",
           "native_state_dict", "read_generation_config", "read_hf_config", "read_tensors",
           "weight_files"]
