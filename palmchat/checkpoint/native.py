"""Checkpoints are folders of safetensors and JSON; nothing is ever unpickled.

A stage's output folder looks like::

    runs/demo/pretrain/
      latest                      -> text file naming the newest complete checkpoint ("step-000400")
      step-000400/
        model.safetensors         weights
        config.json               {"model": ModelConfig, "train": training arguments, "step": ..., "stage": ...,
                                   "tokenizer": {"sha256": ..., "vocab_size": ...}}
        tokenizer.json
        optimizer.safetensors     AdamW moments (kept apart: inference never reads them)
        optimizer.json            param groups and step counts

A checkpoint is written into a temporary folder and renamed into place, then `latest` is replaced
atomically, so a crash at any moment leaves the previous checkpoint intact and `latest` valid.

A Hugging Face model folder (config.json with "model_type", safetensors weights, tokenizer.json and
tokenizer_config.json) is accepted wherever a checkpoint is (checkpoint/hf.py maps it onto palmchat's model), and
so is a repo id ("Qwen/Qwen2.5-0.5B-Instruct") already in the local Hugging Face cache. A checkpoint trained from
such a model carries the tokenizer's other files beside tokenizer.json (`tokenizer.hf.COMPANION_FILES`).

Token ids mean nothing without their tokenizer: two pretraining runs with the same vocabulary size give models of
the same shape whose ids mean different words. So config.json records the identity of the tokenizer saved beside
the weights (`Tokenizer.sha256` of tokenizer.json), and `check_tokenizer` refuses to pair a checkpoint with a
tokenizer it was not trained with (a reward model or critic with another policy, a LoRA adapter with another base).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from palmchat.checkpoint.errors import CheckpointError
from palmchat.model.config import ModelConfig
from palmchat.utils.atomic import atomic_folder, point_latest

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"
TOKENIZER_KEY = "tokenizer"  # config.json: {"sha256": Tokenizer.sha256, "vocab_size": ...} of tokenizer.json
OPTIMIZER_FILE, OPTIMIZER_META = "optimizer.safetensors", "optimizer.json"
ADAPTER_FILE = "adapter.safetensors"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_checkpoint(path: Path) -> bool:
    return (path / MODEL_FILE).is_file() or (path / ADAPTER_FILE).is_file() or is_hf_model_folder(path)


def is_hf_model_folder(path: Path) -> bool:
    from palmchat.checkpoint.hf import is_hf_model_folder as check

    return check(path)


def _state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # tied embeddings share storage; safetensors refuses shared tensors, and the model has no duplicate anyway
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for idx, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                meta["scalars"][f"{idx}.{key}"] = value
    return tensors, meta


def optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: torch.nn.Module, config: dict,
                    tokenizer_path: str | os.PathLike | None = None,
                    optimizer: torch.optim.Optimizer | None = None, keep_last: int = 2,
                    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
                    adapter: str | None = None) -> Path:
    """Write run_dir/step-XXXXXX atomically and point run_dir/latest at it. `config` must hold "model".
    `extra_tensors` {name: tensors} are written as <name>.safetensors inside the same atomic folder.
    `adapter`: save only that LoRA adapter (adapter.safetensors) instead of the full weights; `config`
    then holds "lora" and "base" (the checkpoint the adapter applies to).
    `tokenizer_path` is copied in as tokenizer.json and its identity recorded in config.json (TOKENIZER_KEY)."""
    if tokenizer_path is not None:
        config = {**config, TOKENIZER_KEY: tokenizer_identity(tokenizer_path)}
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    with atomic_folder(run_dir / name) as tmp:
        if adapter is None:
            save_file(_state_dict_for_save(model), tmp / MODEL_FILE)
        else:
            from palmchat.model.lora import adapter_state_dict

            save_file(adapter_state_dict(model, adapter), tmp / ADAPTER_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps({**config, "step": step}, indent=2, default=str))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
            _copy_tokenizer_companions(Path(tokenizer_path).parent, tmp)
        if optimizer is not None:
            tensors, meta = optimizer_tensors(optimizer)
            save_file(tensors, tmp / OPTIMIZER_FILE)
            (tmp / OPTIMIZER_META).write_text(json.dumps(meta))
        for extra_name, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / f"{extra_name}.safetensors")
    point_latest(run_dir, name, keep_last)
    return run_dir / name


def _copy_tokenizer_companions(source: Path, target: Path) -> None:
    """A Hugging Face tokenizer is more than tokenizer.json (its special tokens, chat templates, end-of-sequence
    ids): copy the rest of its folder too, so that the copy has the same identity (sha256)."""
    from palmchat.tokenizer.hf import COMPANION_FILES, is_hf_tokenizer_folder

    if not is_hf_tokenizer_folder(source):
        return
    for name in COMPANION_FILES:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name)
        elif (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder, a run folder whose `latest` names one, a Hugging Face model folder, or the repo id of a
    Hugging Face model in the local cache."""
    if not Path(path).exists() and REPO_ID.match(str(path)):
        return _cached_hf_model(str(path))
    path = Path(path)
    if _is_checkpoint(path):
        return path
    if (path / "latest").is_file():
        target = path / (path / "latest").read_text().strip()
        if _is_checkpoint(target):
            return target
        raise CheckpointError(f"{path / 'latest'} names {target.name}, which has no {MODEL_FILE}")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / CONFIG_FILE).is_file():  # a Hugging Face folder without safetensors: weight_files says what is wrong
        from palmchat.checkpoint.hf import weight_files

        weight_files(path)
    raise CheckpointError(f"{path} is not a checkpoint folder (no {MODEL_FILE} and no 'latest' file)")


def _cached_hf_model(repo_id: str) -> Path:
    """The folder of a Hugging Face model already downloaded into the local cache (palmchat never downloads)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"checkpoint not found: {repo_id} is not a folder, and no Hugging Face model of that name is in the local "
            f"cache ({os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'}). palmchat does not download "
            f"models: run `hf download {repo_id}` first, or pass the model's folder") from None


def read_config(ckpt: str | os.PathLike) -> dict:
    """config.json of a checkpoint; for a Hugging Face model folder, the same shape built from its own config.json:
    {"model": ModelConfig, "stage": "hf", "hf": {"family": ..., ...}}."""
    ckpt = resolve(ckpt)
    if is_hf_model_folder(ckpt):
        from palmchat.checkpoint.hf import hf_model_config, read_hf_config

        hf_config = read_hf_config(ckpt)
        model = hf_model_config(hf_config, str(ckpt / CONFIG_FILE))
        return {"model": model.to_dict(), "stage": "hf", "hf": {"family": hf_config.get("model_type")}}
    try:
        config = json.loads((ckpt / CONFIG_FILE).read_text())
        ModelConfig.from_dict(config["model"])
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: missing {CONFIG_FILE}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: invalid checkpoint config ({e})") from None
    return config


def read_weights(ckpt: str | os.PathLike, shapes: dict[str, torch.Size], strict: bool = True
                 ) -> dict[str, torch.Tensor]:
    """model.safetensors of a checkpoint, checked against the model's tensor `shapes`: the first tensor whose shape
    differs, and (strict) missing or unexpected tensors, are named in a CheckpointError."""
    ckpt = resolve(ckpt)
    try:
        tensors = load_file(ckpt / MODEL_FILE)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{ckpt / MODEL_FILE}: unreadable safetensors file ({e})") from None
    for name, tensor in tensors.items():
        if name in shapes and shapes[name] != tensor.shape:
            raise CheckpointError(f"{ckpt}: tensor {name} has shape {tuple(tensor.shape)} but the model "
                                  f"expects {tuple(shapes[name])} (checkpoint from another model shape)")
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{ckpt}: weights do not match the model (missing: {missing[:3]}, "
                              f"unexpected: {unexpected[:3]})")
    return tensors


def load_weights(model: torch.nn.Module, ckpt: str | os.PathLike, strict: bool = True) -> None:
    """Load model.safetensors into `model`, naming the first tensor whose shape differs."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(read_weights(ckpt, shapes, strict), strict=False)


def load_model(ckpt: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               merge: bool = True):
    """Rebuild the model a checkpoint folder describes. Returns (model, config dict, checkpoint path).
    An adapter-only folder loads its base, adds the adapter, and (merge=True) folds it into the weights."""
    from palmchat.model.transformer import Transformer

    ckpt = resolve(ckpt)
    config = read_config(ckpt)
    if is_hf_model_folder(ckpt):
        from palmchat.checkpoint.hf import load_hf_model

        model, _ = load_hf_model(ckpt, dtype=dtype, device=device)
        return model, config, ckpt
    if (ckpt / MODEL_FILE).is_file():  # the weights in their stored dtype, with no initial weights made first
        model_config = ModelConfig.from_dict(config["model"])
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in Transformer(model_config).state_dict().items()}
        model = Transformer.from_state_dict(model_config, read_weights(ckpt, shapes))
    else:
        from palmchat.model.lora import add_lora, load_adapter, merge_lora

        if "base" not in config or "lora" not in config:
            raise CheckpointError(f"{ckpt / CONFIG_FILE}: an adapter checkpoint needs 'base' and 'lora' entries")
        base_hash = tokenizer_hash(config["base"])
        if base_hash is not None:  # an adapter's ids are its base's: both must come from one tokenizer
            check_tokenizer(ckpt, base_hash, what="LoRA adapter", used_with=f"its base {resolve(config['base'])}",
                            advice=f"Point 'base' in {ckpt / CONFIG_FILE} at the checkpoint the adapter was "
                                   f"trained on")
        model, _, _ = load_model(config["base"])
        lora = config["lora"]
        add_lora(model, lora["name"], rank=lora["rank"], alpha=lora["alpha"], targets=tuple(lora["targets"]))
        load_adapter(ckpt, model, lora["name"])
        if merge:
            model = merge_lora(model, lora["name"], inplace=True)
    model.to(device=device, dtype=dtype)
    return model, config, ckpt


def _load_tokenizer_file(tokenizer_path: Path):
    """palmchat's BPE tokenizer, or a Hugging Face tokenizer when its folder is one (tokenizer_config.json beside)."""
    from palmchat.tokenizer.hf import HFTokenizer, is_hf_tokenizer_folder

    if is_hf_tokenizer_folder(tokenizer_path.parent):
        return HFTokenizer.load(tokenizer_path.parent)
    from palmchat.tokenizer.bpe import Tokenizer

    return Tokenizer.load(tokenizer_path)


def load_tokenizer(ckpt: str | os.PathLike):
    ckpt = resolve(ckpt)
    if not (ckpt / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{ckpt}: missing {TOKENIZER_FILE}")
    return _load_tokenizer_file(ckpt / TOKENIZER_FILE)


def tokenizer_identity(tokenizer_path: str | os.PathLike) -> dict:
    """What config.json records of a tokenizer file: {"sha256": Tokenizer.sha256, "vocab_size": ...}."""
    try:
        tokenizer = _load_tokenizer_file(Path(tokenizer_path))
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"tokenizer to save with the checkpoint: {e}") from None
    return {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size}


def _recorded_tokenizer(ckpt: Path) -> str | None:
    """The tokenizer hash config.json records (None in a checkpoint written before it did)."""
    entry = read_config(ckpt).get(TOKENIZER_KEY)
    return entry.get("sha256") if isinstance(entry, dict) else None


def _carried_tokenizer(ckpt: Path) -> str | None:
    """Tokenizer.sha256 of the tokenizer.json in the folder, recomputed now (None when it carries none)."""
    if not (ckpt / TOKENIZER_FILE).is_file():
        return None
    try:
        return load_tokenizer(ckpt).sha256
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def tokenizer_hash(ckpt: str | os.PathLike) -> str | None:
    """The sha256 of the tokenizer a checkpoint was trained with: of the tokenizer.json it carries, else the hash
    its config.json records (an adapter saved without tokenizer.json), else None (nothing says)."""
    ckpt = resolve(ckpt)
    return _carried_tokenizer(ckpt) or _recorded_tokenizer(ckpt)


def _same_tokenizer(ckpt: Path, sha256: str) -> bool | None:
    """Whether `ckpt` was trained with the tokenizer whose hash is `sha256`; None when the checkpoint says nothing
    (written before config.json recorded it, and no tokenizer.json)."""
    recorded = _recorded_tokenizer(ckpt)
    if recorded == sha256:
        return True
    carried = _carried_tokenizer(ckpt)  # also when the recorded hash differs: a newer `tokenizers` may serialize
    if carried is not None:  # the same tokenizer differently, and the file is what the checkpoint was trained with
        return carried == sha256
    return None if recorded is None else False


def check_tokenizer(ckpt: str | os.PathLike, tokenizer, what: str = "checkpoint", used_with: str = "",
                    advice: str = "") -> None:
    """Refuse (CheckpointError) a checkpoint trained with another tokenizer than `tokenizer` (a Tokenizer, or the
    sha256 of one): its token ids would mean other words, and a reward model or critic would score garbage with no
    other sign of it. `what` names the checkpoint's role in the message, `used_with` what the tokenizer belongs to
    (default: the tokenizer's file), `advice` what to do instead. A checkpoint that records no hash is compared by
    the tokenizer.json it carries; one that carries none either is accepted, with a warning: nothing to compare."""
    ckpt = resolve(ckpt)
    sha256 = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "sha256", None)
    if sha256 is None:
        return  # a tokenizer without an identity (not palmchat's BPE): nothing to compare
    path = getattr(tokenizer, "path", None)
    used_with = used_with or (f"the tokenizer {path}" if path else "the tokenizer in use")
    same = _same_tokenizer(ckpt, sha256)
    if same is None:
        warnings.warn(f"{what} {ckpt}: written before checkpoints recorded their tokenizer, and it carries no "
                      f"{TOKENIZER_FILE}: cannot check that it was trained with {used_with}", stacklevel=2)
        return
    if not same:
        advice = advice or (f"Use a {what} trained from the same pretraining run as the policy (the same "
                            f"{TOKENIZER_FILE}), or train one from the policy's checkpoint (palmchat reward --base)")
        raise CheckpointError(
            f"{what} {ckpt} was trained with another tokenizer than {used_with} (sha256 "
            f"{str(tokenizer_hash(ckpt))[:12]}, from its {CONFIG_FILE} '{TOKENIZER_KEY}' / {TOKENIZER_FILE}, against "
            f"{sha256[:12]}): the same token ids mean different text to the two, so it would only produce garbage. "
            f"{advice}")


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: str | os.PathLike) -> None:
    ckpt = resolve(ckpt)
    if not (ckpt / OPTIMIZER_FILE).is_file():
        raise CheckpointError(f"{ckpt}: no optimizer state to resume from")
    meta = json.loads((ckpt / OPTIMIZER_META).read_text())
    optimizer.load_state_dict(optimizer_state_dict(load_file(ckpt / OPTIMIZER_FILE), meta))
