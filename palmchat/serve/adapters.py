"""The LoRA adapters a server runs beside its base model (`palmchat serve BASE --lora name=PATH`, and
/v1/load_lora_adapter at run time): reading an adapter folder, refusing one that was not trained on the served base,
and the names requests route by ("name", "BASE:name", "name:best-of-4").

An adapter folder is a palmchat LoRA checkpoint (adapter.safetensors, config.json naming its base) or a PEFT folder
(adapter_config.json, adapter_model.safetensors, checkpoint/peft.py maps it onto palmchat's fused layers). Its base
must be the served one: the same tokenizer (its token ids mean the same words) and the same weights (a LoRA delta
is a correction to particular weights; on others it is noise). The base a folder names is compared with the served
base by path, else by the sha256 of their weight files; a PEFT adapter naming a hub id that is not in the local
cache is compared by that id's model name.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import torch

from palmchat import checkpoint
from palmchat.checkpoint.peft import is_peft_folder, native_lora, read_peft_config
from palmchat.model.config import ModelConfig

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
BEST_OF = re.compile(r"best-of-\d+")


class AdapterRefused(ValueError):
    """An adapter this server cannot serve: a bad name, an unreadable folder, or another base."""


def check_adapter_name(name: str, base_id: str) -> None:
    if not NAME.fullmatch(name or ""):
        raise AdapterRefused(f"adapter name {name!r}: use 1 to 64 letters, digits, '-' or '_' (no ':' or '.', which "
                             f"model names split on)")
    if BEST_OF.fullmatch(name) or name == base_id:
        raise AdapterRefused(f"adapter name {name!r} would read as the base model's own name or its ':best-of-N' "
                             f"suffix; pick another")


@functools.cache
def weights_digest(folder: Path) -> str:
    """sha256 of a model folder's weight files (model.safetensors, or a Hugging Face folder's *.safetensors), read
    once per folder and process."""
    files = [folder / checkpoint.MODEL_FILE] if (folder / checkpoint.MODEL_FILE).is_file() else sorted(
        f for f in folder.glob("*.safetensors") if f.name not in ("optimizer.safetensors", checkpoint.ADAPTER_FILE))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def same_base(named: Path, served: Path) -> bool:
    if named.resolve() == served.resolve():
        return True
    named_cfg, served_cfg = checkpoint.read_config(named).get("model"), checkpoint.read_config(served).get("model")
    if named_cfg is not None and served_cfg is not None and named_cfg != served_cfg:
        return False
    return weights_digest(named.resolve()) == weights_digest(served.resolve())


def read_adapter(path: str, name: str, base: str, model_config: ModelConfig, tokenizer
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, {"rank", "alpha", "targets"}) of the adapter folder `path`, for add_adapter_weights on the served
    base (the checkpoint folder `base`, whose tokenizer is `tokenizer`); AdapterRefused says what is wrong, naming
    the adapter."""
    try:
        folder = Path(path)
        served = checkpoint.resolve(base)
        if is_peft_folder(folder):
            return _read_peft(folder, name, served, model_config, tokenizer)
        folder = checkpoint.resolve(folder)
        if not (folder / checkpoint.ADAPTER_FILE).is_file():
            raise AdapterRefused(f"adapter {name!r}: {folder} holds full weights, not a LoRA adapter (no "
                                 f"{checkpoint.ADAPTER_FILE} or adapter_config.json): serve it on its own")
        config = checkpoint.read_config(folder)
        if "base" not in config or "lora" not in config:
            raise AdapterRefused(f"adapter {name!r}: {folder / 'config.json'} has no 'base' and 'lora' entries")
        checkpoint.check_tokenizer(folder, tokenizer, what=f"LoRA adapter {name!r}",
                                   used_with=f"the served base {served}",
                                   advice="Serve it with the base it was trained on.")
        try:
            named = checkpoint.resolve(config["base"])
        except checkpoint.CheckpointError:
            named = None
        if named is None or not same_base(named, served):
            raise AdapterRefused(f"adapter {name!r}: it was trained on the base {config['base']}, whose weights are "
                                 f"not those of the served base {served}{' (not found here)' if named is None else ''}"
                                 f": a LoRA update only means something on the weights it was trained on")
        from palmchat.model.lora import read_adapter_file

        tensors, _ = read_adapter_file(folder)
        lora = config["lora"]
        return tensors, {"rank": lora["rank"], "alpha": lora["alpha"], "targets": list(lora["targets"])}
    except (checkpoint.CheckpointError, OSError, ValueError, KeyError) as e:
        if isinstance(e, AdapterRefused):
            raise
        raise AdapterRefused(f"adapter {name!r}: {e}") from None


def _read_peft(folder: Path, name: str, served: Path, model_config: ModelConfig, tokenizer):
    config = read_peft_config(folder)
    if (folder / checkpoint.TOKENIZER_FILE).is_file():
        checkpoint.check_tokenizer(folder, tokenizer, what=f"LoRA adapter {name!r}",
                                   used_with=f"the served base {served}",
                                   advice="Serve it with the base it was trained on.")
    named = config.get("base_model_name_or_path") or ""
    try:
        named_folder = checkpoint.resolve(named) if named else None
    except checkpoint.CheckpointError:
        named_folder = None
    if named_folder is not None:
        matches = same_base(named_folder, served)
    else:  # a hub id not in the local cache: its model name against the served folder's (or its cache entry's)
        model_name = named.rstrip("/").rpartition("/")[2]
        matches = bool(model_name) and (served.name == model_name or f"--{model_name}" in str(served))
    if not matches:
        raise AdapterRefused(f"adapter {name!r}: its adapter_config.json names the base {named or '(none)'}, which is "
                             f"not the served base {served}: a LoRA update only means something on the weights it "
                             f"was trained on")
    family = checkpoint.read_config(served).get("hf", {}).get("family")
    if family is None:
        from palmchat.checkpoint.hf import hf_family_for

        family = hf_family_for(model_config)
    return native_lora(folder, model_config, family)


def add_to_model(model: torch.nn.Module, name: str, tensors: dict[str, torch.Tensor], lora: dict) -> None:
    """The adapter joins the model, frozen and inactive (requests choose it row by row)."""
    from palmchat.model.lora import AdapterError, add_adapter_weights

    try:
        add_adapter_weights(model, name, tensors, lora)
    except AdapterError as e:
        raise AdapterRefused(f"adapter {name!r}: {e}") from None


def parse_lora_flags(values: list[str]) -> dict[str, str]:
    """--lora name=PATH ... -> {name: path}."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora {value!r}: expected NAME=PATH (a palmchat LoRA checkpoint or a PEFT folder)")
        if name in out:
            raise ValueError(f"--lora: the name {name!r} is given twice")
        out[name] = path
    return out


__all__ = ["AdapterRefused", "add_to_model", "check_adapter_name", "parse_lora_flags", "read_adapter", "same_base",
           "weights_digest"]
