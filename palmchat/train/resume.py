"""Resumable training state for every stage after pretraining (SFT, reward, DPO, KTO, PPO, GRPO, RLOO).

A stage saves, every `--save-every` steps, what it needs to continue exactly where it was:

    OUT/resume/
      latest                   -> "step-000040"
      step-000040/
        trainable.safetensors  the trainable parameters of each module ("policy/blocks.0...", "value_head/weight")
        optimizers.safetensors each optimizer's moments ("policy/3.exp_avg")
        rng.safetensors        torch's CPU (and CUDA) generator states, and any torch.Generator the stage names
        state.json             step, optimizer param groups and scalars, Python random.Random states, and the
                               stage's own JSON state (a KL controller's coefficient, a data order ...)

Only trainable parameters are kept: frozen weights (a LoRA base, a reference model) come back from the checkpoint
the stage started from. Each state is written into a temporary folder and renamed into place before `latest`
moves, so a crash at any moment leaves the previous state whole. With the same arguments, a resumed run takes the
same batches, dropout masks and samples as an uninterrupted one (tests/test_resume.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from palmchat.checkpoint.native import optimizer_state_dict, optimizer_tensors
from palmchat.utils.atomic import atomic_folder, point_latest

RESUME_DIR = "resume"


class ResumeError(ValueError):
    pass


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


def latest_state(out: str | os.PathLike) -> Path | None:
    """The newest complete resumable state in a stage's output folder, or None."""
    folder = Path(out) / RESUME_DIR
    if not (folder / "latest").is_file():
        return None
    path = folder / (folder / "latest").read_text().strip()
    if not (path / "state.json").is_file():
        raise ResumeError(f"{folder / 'latest'} names {path.name}, which has no state.json")
    return path


def start_or_resume(out: str | os.PathLike, resume: bool, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], rngs: dict | None = None) -> tuple[int, dict]:
    """(steps done, the stage's JSON state). With `resume`, the newest state in OUT/resume loaded in place (see
    load_state). Without, (0, {}) and the run starts over: the resumable states of an earlier run in OUT are removed
    (their steps would be mistaken for this run's)."""
    if resume:
        return load_state(out, modules, optimizers, rngs)
    states = Path(out) / RESUME_DIR
    if states.exists():
        print(f"starting over: removing the resumable states of an earlier run in {states} (--resume continues it)")
        shutil.rmtree(states)
    return 0, {}


def save_state(out: str | os.PathLike, step: int, modules: dict[str, torch.nn.Module],
               optimizers: dict[str, torch.optim.Optimizer], rngs: dict | None = None, state: dict | None = None,
               keep_last: int = 2) -> Path:
    """Write OUT/resume/step-XXXXXX atomically and point OUT/resume/latest at it (layout: module docstring).
    `rngs` {name: random.Random or torch.Generator} beyond torch's global generators; `state` is any JSON."""
    folder = Path(out) / RESUME_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    with atomic_folder(folder / name) as tmp:
        params = {f"{m}/{k}": v.detach().contiguous().cpu() for m, module in modules.items()
                  for k, v in _trainable(module).items()}
        save_file(params, tmp / "trainable.safetensors")
        moments, metas = {}, {}
        for opt_name, optimizer in optimizers.items():
            tensors, metas[opt_name] = optimizer_tensors(optimizer)
            moments.update({f"{opt_name}/{k}": v for k, v in tensors.items()})
        save_file(moments, tmp / "optimizers.safetensors")
        generators = {"torch/cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            generators.update({f"torch/cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        python_rngs = {}
        for rng_name, rng in {**(rngs or {}), "global": random}.items():
            if isinstance(rng, torch.Generator):
                generators[f"generator/{rng_name}"] = rng.get_state()
            else:
                version, internal, gauss = rng.getstate()
                python_rngs[rng_name] = [version, list(internal), gauss]
        save_file(generators, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizers": metas, "python_rngs": python_rngs,
                                                    "state": state or {}}))
    point_latest(folder, name, keep_last)
    return folder / name


def load_state(out: str | os.PathLike, modules: dict[str, torch.nn.Module],
               optimizers: dict[str, torch.optim.Optimizer], rngs: dict | None = None) -> tuple[int, dict]:
    """Restore the newest state in OUT/resume into the given (freshly built) modules, optimizers and generators, in
    place. Returns (step, the stage's JSON state). The modules must have the same trainable parameters as when
    saved: a different --lora-rank or model is refused, naming what differs."""
    path = latest_state(out)
    if path is None:
        raise ResumeError(f"--resume: no resumable state in {Path(out) / RESUME_DIR}")
    meta = json.loads((path / "state.json").read_text())
    params = load_file(path / "trainable.safetensors")
    for m, module in modules.items():
        saved, current = _split(params, m), _trainable(module)
        if saved.keys() != current.keys() or any(saved[k].shape != v.shape for k, v in current.items()):
            diff = sorted(saved.keys() ^ current.keys())[:3] or [k for k, v in current.items()
                                                                  if saved[k].shape != v.shape][:3]
            raise ResumeError(f"{path}: the saved trainable parameters of {m!r} do not match this run's "
                              f"(e.g. {', '.join(diff)}); resume with the arguments the run was started with")
        with torch.no_grad():
            for k, v in current.items():
                v.copy_(saved[k])
    moments = load_file(path / "optimizers.safetensors")
    for opt_name, optimizer in optimizers.items():
        optimizer.load_state_dict(optimizer_state_dict(_split(moments, opt_name), meta["optimizers"][opt_name]))
    generators = load_file(path / "rng.safetensors")
    torch.set_rng_state(generators["torch/cpu"])
    if torch.cuda.is_available():
        cuda = [generators[k] for k in sorted(generators) if k.startswith("torch/cuda")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    for rng_name, rng in {**(rngs or {}), "global": random}.items():
        if isinstance(rng, torch.Generator):
            rng.set_state(generators[f"generator/{rng_name}"])
        else:
            version, internal, gauss = meta["python_rngs"][rng_name]
            rng.setstate((version, tuple(internal), gauss))
    return meta["step"], meta["state"]
