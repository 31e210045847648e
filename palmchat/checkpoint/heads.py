"""Reward and value model checkpoints: ordinary model checkpoint folders plus one file::

    model.safetensors   the backbone's weights (same names as any model checkpoint:
                        ``checkpoint.load_model`` loads it as a language model)
    head.safetensors    the head: ``weight`` (1, dim), ``bias`` (1,), and ``gap_weight`` (1,) for a reward model
                        whose readout is "eot+gap" (model/heads.py)
    config.json         {"model": ..., "head": "reward" | "value", "eot_id": ..., "readout": ... (reward only),
                         "tokenizer": {"sha256": ..., "vocab_size": ...}, ...}

A reward model or critic only means something with the tokenizer it was trained with: pass the policy's
tokenizer to the loaders (``tokenizer=``) and a checkpoint from another pretraining run is refused
(``checkpoint.check_tokenizer``) instead of scoring garbage.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from palmchat.checkpoint import native as checkpoint
from palmchat.model.heads import READOUTS, RewardModel, ScalarHeadModel, ValueModel

HEAD_FILE = "head.safetensors"


def _save(model: ScalarHeadModel, run_dir, step, config, tokenizer_path, optimizer, keep_last, adapter=None) -> Path:
    """adapter: save only that LoRA adapter of the backbone (config must then name "lora" and "base")."""
    config = {**config, "model": model.config.to_dict(), "head": model.kind}
    if isinstance(model, RewardModel):
        config.update(eot_id=model.eot_id, readout=model.readout)
    return checkpoint.save_checkpoint(run_dir, step, model.backbone, config, tokenizer_path=tokenizer_path,
                                      optimizer=optimizer, keep_last=keep_last, adapter=adapter,
                                      extra_tensors={HEAD_FILE.removesuffix(".safetensors"): model.head_state_dict()})


def save_reward_model(model: RewardModel, run_dir: str | os.PathLike, step: int, config: dict,
                      tokenizer_path: str | os.PathLike | None = None,
                      optimizer: torch.optim.Optimizer | None = None, keep_last: int = 2,
                      adapter: str | None = None) -> Path:
    """Atomically write run_dir/step-XXXXXX (backbone in model.safetensors, head in head.safetensors)."""
    return _save(model, run_dir, step, config, tokenizer_path, optimizer, keep_last, adapter)


def save_value_model(model: ValueModel, run_dir: str | os.PathLike, step: int, config: dict,
                     tokenizer_path: str | os.PathLike | None = None,
                     optimizer: torch.optim.Optimizer | None = None, keep_last: int = 2) -> Path:
    """Like :func:`save_reward_model`, for the critic."""
    return _save(model, run_dir, step, config, tokenizer_path, optimizer, keep_last)


def _reward_eot_id(ckpt: Path, config: dict, eot_id: int | None) -> int:
    """The id a reward model reads its score at: the one its config stores, else the caller's."""
    stored = config.get("eot_id")
    if stored is None and eot_id is None:
        raise checkpoint.CheckpointError(f"{ckpt}: the config names no eot_id; pass the tokenizer's "
                                         "(tokenizer.chat_format.eot_id)")
    if stored is not None and eot_id is not None and int(stored) != eot_id:
        raise checkpoint.CheckpointError(f"{ckpt}: the reward model reads its score at eot id {stored}, "
                                         f"not at the tokenizer's {eot_id}")
    return int(stored if stored is not None else eot_id)


def _load(cls, path, what: str, device, dtype, accept: tuple[str, ...], eot_id: int | None = None,
          tokenizer=None):
    ckpt = checkpoint.resolve(path)
    if checkpoint.is_hf_model_folder(ckpt):
        return _load_hf(cls, ckpt, what, device, dtype, eot_id, tokenizer)
    if not (ckpt / HEAD_FILE).is_file():
        raise checkpoint.CheckpointError(f"{ckpt} is not a {what} checkpoint (no {HEAD_FILE})")
    config = checkpoint.read_config(ckpt)
    kind = config.get("head")
    if kind is not None and kind not in accept:
        raise checkpoint.CheckpointError(f"{ckpt} is a {kind} model checkpoint, not a {what} checkpoint")
    if tokenizer is not None:
        checkpoint.check_tokenizer(ckpt, tokenizer, what=what)
    kwargs = {}
    if cls is RewardModel:
        readout = config.get("readout", "eot")
        if readout not in READOUTS:
            raise checkpoint.CheckpointError(f"{ckpt}: config.json: unknown reward readout {readout!r} (this "
                                             f"palmchat reads {', '.join(READOUTS)})")
        kwargs = {"eot_id": _reward_eot_id(ckpt, config, eot_id), "readout": readout}
    backbone, _, _ = checkpoint.load_model(ckpt)  # full weights, or a base with its LoRA adapter merged in
    model = cls(backbone, **kwargs)
    try:
        tensors = load_file(ckpt / HEAD_FILE)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise checkpoint.CheckpointError(f"{ckpt / HEAD_FILE}: unreadable safetensors file ({e})") from None
    try:
        model.load_head_state_dict(tensors)
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{ckpt / HEAD_FILE}: {e}") from None
    model.to(device=device, dtype=dtype)
    return model, config


def _load_hf(cls, ckpt: Path, what: str, device, dtype, eot_id: int | None, tokenizer):
    """A Hugging Face *ForSequenceClassification folder as a reward or value model: its backbone, and its score
    head (no bias) as ours with a zero bias. It scores where palmchat's reward models do: at the reply's
    end-of-turn token."""
    from palmchat.checkpoint.hf import load_hf_reward_backbone

    if tokenizer is not None:
        checkpoint.check_tokenizer(ckpt, tokenizer, what=what)
    if cls is RewardModel and eot_id is None:
        eot_id = checkpoint.load_tokenizer(ckpt).chat_format.eot_id
    backbone, score, info = load_hf_reward_backbone(ckpt)
    model = cls(backbone, *((eot_id,) if cls is RewardModel else ()))
    with torch.no_grad():
        model.head.weight.copy_(score)
        model.head.bias.zero_()
    model.to(device=device, dtype=dtype)
    return model, {**checkpoint.read_config(ckpt), "head": model.kind, "hf": {"family": info["family"]}}


def load_reward_model(path: str | os.PathLike, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None, eot_id: int | None = None,
                      tokenizer=None) -> tuple[RewardModel, dict]:
    """Load a reward-model checkpoint folder (or run folder with ``latest``) -> (RewardModel, config).

    ``eot_id`` (the tokenizer's ``chat_format.eot_id``) is needed for checkpoints whose config does not store it;
    when both are known they must agree. ``tokenizer``: the tokenizer of the policy it will score; a reward model
    trained with another one is refused with a CheckpointError (see ``checkpoint.check_tokenizer``).
    """
    return _load(RewardModel, path, "reward model", device, dtype, accept=("reward",), eot_id=eot_id,
                 tokenizer=tokenizer)


def load_value_model(path: str | os.PathLike, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None, tokenizer=None) -> tuple[ValueModel, dict]:
    """Load a value-model checkpoint, or a reward-model one to initialise the critic from it. ``tokenizer``: as
    for :func:`load_reward_model`."""
    return _load(ValueModel, path, "value model", device, dtype, accept=("value", "reward"), tokenizer=tokenizer)
