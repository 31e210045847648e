"""LoRA adapters as PEFT folders (adapter_config.json + adapter_model.safetensors), out and in.

palmchat's LoRA sits on its fused linears (q, k and v in one `qkv`, gate and up in one `gate_up`); PEFT's on each
Hugging Face projection. Out: an adapter's A is shared by the parts of a fused linear and its B splits by rows
exactly as the weight does (hf.py's name table and row layouts), so q_proj, k_proj and v_proj each get A and their
rows of B: the same update, exactly. In: the parts' adapters are stacked into one of rank r * parts (A the parts'
As one above another, B block-diagonal), padded with zeros to one rank R for every layer (palmchat keeps one rank
per adapter), and alpha scaled by R / r so that every update is alpha / r * B A as in PEFT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from palmchat.checkpoint.errors import CheckpointError
from palmchat.checkpoint.hf import name_map, part_rows, row_layout, to_hf_rows, to_native_rows
from palmchat.model.config import ModelConfig
from palmchat.utils.atomic import atomic_folder

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the model's own names
# settings of a PEFT LoRA that change what it computes and that palmchat does not implement: refused by name
UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "modules_to_save": None,
               "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none"}


def is_peft_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def export_peft(lora_tensors: dict[str, torch.Tensor], lora: dict, cfg: ModelConfig, family: str,
                out_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """An adapter (`lora_tensors` as palmchat.model.lora.adapter_state_dict gives them, `lora` as lora_config)
    of a model with config `cfg` as a PEFT folder for the Hugging Face `family`; `base_model` is what its
    adapter_config.json names as the base. Written atomically."""
    names = name_map(family, cfg)
    tensors = {}
    for key, t in lora_tensors.items():
        module, _, kind = key.rpartition(".")  # "blocks.0.qkv", "lora_A" | "lora_B"
        weight = f"{module}.weight"
        if weight not in names:
            raise CheckpointError(f"adapter tensor {key}: palmchat's {weight} has no {family} name")
        parts = names[weight]
        pieces = t.split(part_rows(weight, cfg, t.shape[0], len(parts))) if kind == "lora_B" else [t] * len(parts)
        for hf_name, piece in zip(parts, pieces):
            if kind == "lora_B":
                piece = to_hf_rows(piece, row_layout(family, hf_name), cfg)
            tensors[f"{PREFIX}{hf_name.removesuffix('.weight')}.{kind}.weight"] = piece.detach().float().clone()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": 0.0, "inference_mode": True,
              "target_modules": sorted({k.split(".")[-3] for k in tensors}), **UNSUPPORTED}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out_dir) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def read_peft_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type') if isinstance(config, dict) else None!r}: "
                              f"only LoRA adapters are supported")
    for field, plain in UNSUPPORTED.items():
        if (config.get(field, plain) or None) != (plain or None):  # an empty list or dict is the plain setting too
            raise CheckpointError(f"{path}: {field}={config[field]!r} is not supported (palmchat's LoRA is plain "
                                  f"LoRA: {field}={plain!r})")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or config[field] <= 0:
            raise CheckpointError(f"{path}: {field} must be a positive number, got {config.get(field)!r}")
    return config


def native_lora(folder: str | os.PathLike, cfg: ModelConfig, family: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A PEFT LoRA folder for a `family` model with config `cfg` -> (tensors for
    palmchat.model.lora.load_adapter_state_dict, {"rank", "alpha", "targets"} for add_lora): the same updates."""
    folder = Path(folder)
    config = read_peft_config(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS} (pickle .bin adapters are never read: save it with "
                              f"safe_serialization)")
    peft = load_file(folder / ADAPTER_WEIGHTS)
    r, scale = int(config["r"]), config["lora_alpha"] / config["r"]
    by_part = {}  # "model.layers.0.self_attn.q_proj" -> native weight, index among its parts
    for native, parts in name_map(family, cfg).items():
        for k, hf_name in enumerate(parts):
            by_part[hf_name.removesuffix(".weight")] = (native, k)
    found: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in peft:
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: unexpected tensor {key!r}")
            continue
        module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        if module not in by_part:
            raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: tensor {key!r} adapts {module}, which a {family} "
                                  f"model with this config does not have")
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in peft:
            raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: {key} has no {b_key}")
        native, k = by_part[module]
        b = to_native_rows(peft[b_key], row_layout(family, f"{module}.weight"), cfg)
        found.setdefault(native, {})[k] = (peft[key], b)
    if not found:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: no LoRA tensors")
    names = name_map(family, cfg)
    rank = r * max(len(names[native]) for native in found)
    tensors = {}
    for native, parts in found.items():
        module = native.removesuffix(".weight")
        n_parts = len(names[native])
        in_dim = next(iter(parts.values()))[0].shape[1]
        rows = part_rows(native, cfg, next(iter(parts.values()))[1].shape[0], n_parts)  # of each part's B
        A, B = torch.zeros(rank, in_dim), torch.zeros(sum(rows), rank)
        for k, (a, b) in parts.items():
            if a.shape != (r, in_dim) or b.shape != (rows[k], r):
                raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: {names[native][k]}'s LoRA has shapes "
                                      f"{tuple(a.shape)} and {tuple(b.shape)}, not ({r}, {in_dim}) and "
                                      f"({rows[k]}, {r})")
            A[k * r:(k + 1) * r] = a.float()
            B[sum(rows[:k]):sum(rows[:k + 1]), k * r:(k + 1) * r] = b.float()
        tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = A, B
    targets = sorted({native.split(".")[-2] for native in found})
    return tensors, {"rank": rank, "alpha": scale * rank, "targets": targets}
