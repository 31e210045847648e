"""LoRA: named low-rank adapters on a frozen base model.

LoRA: Low-Rank Adaptation of Large Language Models, Hu et al. 2021, https://arxiv.org/abs/2106.09685
In the spirit of lucidrains' named `LoRA` fine-tune scopes (palm-rlhf-pytorch) and litgpt's lora.py.

A frozen linear layer W (out, in) gets a trainable update scale * B @ A with A (r, in), B (out, r),
r << min(in, out), scale = alpha / r. B starts at zero, so a new adapter changes nothing until trained.

Many adapters live side by side on one base, each under a name: the PPO actor, the critic and the
reward model can share one frozen Transformer in memory, the frozen reference policy is "the same base with
LoRA switched off", and the server decodes one batch whose rows each use a different fine-tune.

Which adapter a `LoRALinear` applies is state on the module, set model-wide by the helpers below:

    set_adapter(model, "actor")            # one adapter for the whole batch
    set_adapter(model, None)               # base only
    with use_adapter(model, "critic"): ... # temporarily, then the previous state is restored
    set_row_adapters(model, ["a", None, "b", "a"])  # per row of the batch (serving)

Typical use::

    add_lora(model, "actor", rank=8, alpha=16)      # base frozen, only "actor" trainable
    optimizer = torch.optim.AdamW(lora_parameters(model, "actor"), lr=1e-4)
    ...
    save_adapter(folder, model, "actor", lora_config(model, "actor"))   # adapter.safetensors only
    plain = merge_lora(model, "actor")              # a plain PaLM with W + scale * B @ A

Shapes: B batch, T tokens, I in features, O out features, r rank, N adapters used in a batch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from palmchat.utils.atomic import atomic_path

ADAPTER_FILE = "adapter.safetensors"
DEFAULT_TARGETS = ("in_proj", "qkv", "attn_out", "gate_up", "ff_in", "ff_out")


class AdapterError(ValueError):
    pass


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise AdapterError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if hasattr(nn.ParameterDict(), name) or hasattr(nn.ModuleDict(), name):
        raise AdapterError(f"cannot use {name!r} as an adapter name (it is an attribute of "
                           "nn.ParameterDict/nn.Module, e.g. 'keys', 'copy', 'train'); pick another name")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (self.base, with its bias if it has one) plus named low-rank adapters.

    forward(x) = base(x) + delta, where delta is
      - scale[n] * B[n] @ A[n] x      when one adapter n is active for the whole batch,
      - nothing                       when no adapter is active (or the active one is not on this layer),
      - per row b: that row's adapter when per-row slots are set (rows with slot -1 get base only).
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ParameterDict()  # name -> (r, I)
        self.lora_B = nn.ParameterDict()  # name -> (O, r)
        self.lora_dropout = nn.ModuleDict()  # name -> Dropout or Identity
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}  # alpha / rank
        # which adapter is applied (set through set_adapter / set_row_adapters, not by hand)
        self.active_adapter: str | None = None
        self.row_adapters: tuple[str, ...] | None = None  # slot -> adapter name, per-row mode only
        self.row_slots: torch.Tensor | None = None  # (B,) long, index into row_adapters, -1 = none
        self._row_cache: tuple | None = None  # (row_slots, A, B) gathered per row for those slots

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (O, I), for code that reads `.weight` of a linear layer."""
        return self.base.weight

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0) -> None:
        _check_name(name)
        if name in self.lora_A:
            raise AdapterError(f"adapter {name!r} already exists on this layer")
        if not isinstance(rank, int) or rank < 1:
            raise AdapterError(f"LoRA rank must be a positive integer, got {rank!r}")
        w = self.base.weight
        A = torch.empty(rank, self.in_features, device=w.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as nn.Linear initialises its weight (litgpt, peft)
        B = torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype)  # zero: starts as no change
        self.lora_A[name] = nn.Parameter(A.to(w.dtype))
        self.lora_B[name] = nn.Parameter(B)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank[name], self.alpha[name], self.scaling[name] = rank, float(alpha), alpha / rank
        self._row_cache = None

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * B @ A: (O, I), computed in float32."""
        return (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, ..., I) -> (B, ..., O)."""
        y = self.base(x)
        if self.row_slots is not None:
            return self._add_per_row_delta(x, y)
        if self.active_adapter is not None and self.active_adapter in self.lora_A:
            n = self.active_adapter
            h = F.linear(self.lora_dropout[n](x), self.lora_A[n])  # (B, ..., r)
            # y + scale * h @ B^T as one GEMM that accumulates into y: no (B, ..., O) scaled copy to add
            out = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]).to(y.dtype),
                              self.lora_B[n].t().to(y.dtype), alpha=self.scaling[n])
            return out.view(y.shape)
        return y

    def _add_per_row_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + each row's own delta: row b's A and B (gathered once per batch, see `_row_weights`), then two batched
        matmuls (the BGMV idea of Punica / S-LoRA: the base matmul stays shared by the batch, no loop over rows or
        adapters). They run in float32, as PyTorch's small bf16 batched matmuls are slower than fp32 ones on CPUs.
        Dropout is not applied in this mode (it is for serving)."""
        if x.shape[0] != self.row_slots.shape[0]:
            raise AdapterError(f"set_row_adapters gave {self.row_slots.shape[0]} rows but the batch has {x.shape[0]}")
        A, Bm = self._row_weights()  # (B, I, r), (B, r, O)
        if A is None:
            return y
        xb = x.reshape(x.shape[0], -1, self.in_features)  # (B, T, I)
        delta = torch.bmm(torch.bmm(xb.float(), A), Bm).reshape(y.shape)  # (B, T, r) -> (B, T, O)
        if torch.is_grad_enabled():
            return y + delta.to(y.dtype)
        return y.add_(delta)  # one op: adds and rounds to y's dtype (y is this call's own output)

    def _row_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Row b's adapter as float32 (B, I, r) A-transposes and (B, r, O) B-transposes with the scale folded in (zeros
        for a row without an adapter on this layer; ranks padded with zeros to the largest, which adds nothing), or
        (None, None) when no row has one here. Outside autograd they are kept until the rows change (set_row_adapters
        or the engine dropping finished rows give a new `row_slots` tensor), so a decode step gathers nothing; they
        hold batch * r * (I + O) numbers. With gradients on they are gathered at every call, so they train."""
        cached = self._row_cache
        if cached is not None and cached[0] is self.row_slots and not torch.is_grad_enabled():
            return cached[1], cached[2]
        names = [self.row_adapters[s] if s >= 0 else None for s in self.row_slots.tolist()]
        present = [n for n in dict.fromkeys(names) if n is not None and n in self.lora_A]
        A = Bm = None
        if present:
            r = max(self.rank[n] for n in present)
            ref = self.lora_A[present[0]]
            zero_A = ref.new_zeros(self.in_features, r, dtype=torch.float32)
            zero_B = ref.new_zeros(r, self.out_features, dtype=torch.float32)
            A_of = {n: F.pad(self.lora_A[n].float(), (0, 0, 0, r - self.rank[n])).t() for n in present}  # (I, r)
            B_of = {n: F.pad(self.lora_B[n].float() * self.scaling[n], (0, r - self.rank[n])).t()
                    for n in present}  # (r, O)
            A = torch.stack([A_of.get(n, zero_A) for n in names])  # (B, I, r)
            Bm = torch.stack([B_of.get(n, zero_B) for n in names])  # (B, r, O)
        self._row_cache = None if torch.is_grad_enabled() else (self.row_slots, A, Bm)
        return A, Bm

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.rank[n]}, alpha={self.alpha[n]:g})" for n in self.lora_A)
        return f"in={self.in_features}, out={self.out_features}, adapters=[{adapters}]"


# ---------------------------------------------------------------------------------------------
# Adding adapters and choosing which one is active
# ---------------------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapters(model: nn.Module) -> list[str]:
    """Adapter names present anywhere in the model, in the order they were added."""
    names: dict[str, None] = {}
    for _, m in lora_layers(model):
        names.update(dict.fromkeys(m.lora_A.keys()))
    return list(names)


def _require(model: nn.Module, name: str) -> None:
    if name not in adapters(model):
        have = adapters(model)
        raise AdapterError(f"model has no adapter {name!r}" + (f" (it has: {', '.join(have)})" if have
                                                                else " (it has no LoRA adapters)"))


def _add_adapter(model: nn.Module, name: str, rank: int, alpha: float, targets, dropout: float) -> None:
    """Wrap the target linear layers (matched by attribute name) and add adapter `name` to each."""
    _check_name(name)
    if name in adapters(model):
        raise AdapterError(f"model already has an adapter named {name!r}")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    found = 0
    for full_name, module in list(model.named_modules()):
        parent_name, _, attr = full_name.rpartition(".")
        if attr not in targets:
            continue
        if isinstance(module, nn.Linear):
            module = LoRALinear(module)
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
        elif not isinstance(module, LoRALinear):
            continue
        module.add_adapter(name, rank, alpha, dropout)
        found += 1
    if not found:
        raise AdapterError(f"no linear layer named any of {', '.join(targets)} in the model")


def add_lora(model: nn.Module, name: str = "default", rank: int = 8, alpha: float = 16,
             targets=DEFAULT_TARGETS, dropout: float = 0.0) -> nn.Module:
    """Add adapter `name` to the target linear layers (replacing them by LoRALinear the first time).

    Afterwards every parameter of the model is frozen except this adapter's A and B, and the adapter is
    active. Call it again with another name for a second adapter on the same frozen base.
    Returns the model (modified in place)."""
    _add_adapter(model, name, rank, alpha, targets, dropout)
    mark_trainable(model, name)
    set_adapter(model, name)
    return model


def mark_trainable(model: nn.Module, *names: str) -> nn.Module:
    """Freeze everything except the named adapters (e.g. to train actor and critic adapters together)."""
    for n in names:
        _require(model, n)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        for p in lora_parameters(model, n):
            p.requires_grad_(True)
    return model


def _set_state(model: nn.Module, active: str | None, row_adapters=None, row_slots=None) -> None:
    for _, m in lora_layers(model):
        m.active_adapter, m.row_adapters, m.row_slots = active, row_adapters, row_slots


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Apply adapter `name` to every row, or nothing (None: the plain base model)."""
    if name is not None:
        _require(model, name)
    _set_state(model, name)


def set_row_adapters(model: nn.Module, names: list[str | None]) -> None:
    """Per-row adapters: row b of the next batches uses names[b] (None: base only for that row)."""
    used = list(dict.fromkeys(n for n in names if n is not None))  # slot -> name, in first-use order
    for n in used:
        _require(model, n)
    slot_of = {n: i for i, n in enumerate(used)}
    device = next((p.device for _, m in lora_layers(model) for p in m.lora_A.values()), None)
    slots = torch.tensor([-1 if n is None else slot_of[n] for n in names], dtype=torch.long, device=device)
    _set_state(model, None, tuple(used), slots)


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None | list[str | None]):
    """Temporarily use adapter `name` (None: base only; a list: per-row adapters); the previous
    state is restored on exit, even after an exception."""
    saved = [(m, m.active_adapter, m.row_adapters, m.row_slots) for _, m in lora_layers(model)]
    try:
        if isinstance(name, (list, tuple)):
            set_row_adapters(model, list(name))
        else:
            set_adapter(model, name)
        yield model
    finally:
        for m, active, row_adapters, row_slots in saved:
            m.active_adapter, m.row_adapters, m.row_slots = active, row_adapters, row_slots


def remove_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter `name` (e.g. the server unloading a fine-tune). Layers left without any adapter go
    back to plain nn.Linear. If the adapter was in use, the model falls back to the base."""
    _require(model, name)
    for full, m in lora_layers(model):
        if m.active_adapter == name or (m.row_adapters is not None and name in m.row_adapters):
            m.active_adapter, m.row_adapters, m.row_slots = None, None, None
        if name in m.lora_A:
            del m.lora_A[name], m.lora_B[name], m.lora_dropout[name]
            del m.rank[name], m.alpha[name], m.scaling[name]
            m._row_cache = None
        if not m.lora_A:
            parent_name, _, attr = full.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, m.base)


# ---------------------------------------------------------------------------------------------
# Parameters and state dicts of one adapter
# ---------------------------------------------------------------------------------------------


def lora_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """A and B of adapter `name` in every layer that has it (what the optimizer should see)."""
    _require(model, name)
    return [p for _, m in lora_layers(model) if name in m.lora_A for p in (m.lora_A[name], m.lora_B[name])]


def lora_config(model: nn.Module, name: str) -> dict:
    """{"name", "rank", "alpha", "targets"}: what a caller puts in config.json next to the adapter."""
    _require(model, name)
    layers = [(full, m) for full, m in lora_layers(model) if name in m.lora_A]
    ranks = {m.rank[name] for _, m in layers}
    alphas = {m.alpha[name] for _, m in layers}
    if len(ranks) > 1 or len(alphas) > 1:
        raise AdapterError(f"adapter {name!r} has different ranks/alphas on different layers")
    targets = list(dict.fromkeys(full.rpartition(".")[2] for full, _ in layers))
    return {"name": name, "rank": ranks.pop(), "alpha": alphas.pop(), "targets": targets}


_lora_config_of = lora_config  # save_adapter's argument of the same name shadows it


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Only adapter `name`'s tensors, keyed like "blocks.0.in_proj.lora_A" (detached copies)."""
    _require(model, name)
    out = {}
    for full, m in lora_layers(model):
        if name in m.lora_A:
            out[f"{full}.lora_A"] = m.lora_A[name].detach().clone()  # (r, I)
            out[f"{full}.lora_B"] = m.lora_B[name].detach().clone()  # (O, r)
    return out


def load_adapter_state_dict(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` (as from adapter_state_dict) into the existing adapter `name`. Every key must
    match a tensor of the adapter in shape; errors name the offending key."""
    _require(model, name)
    expected = {}
    for full, m in lora_layers(model):
        if name in m.lora_A:
            expected[f"{full}.lora_A"] = m.lora_A[name]
            expected[f"{full}.lora_B"] = m.lora_B[name]
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise AdapterError(f"adapter {name!r}: tensors do not match the model's layers "
                           f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    for key, param in expected.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise AdapterError(f"adapter {name!r}: tensor {key} has shape {tuple(tensors[key].shape)} but the "
                               f"model expects {tuple(param.shape)} (different rank or model shape?)")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])
    for _, m in lora_layers(model):
        m._row_cache = None  # per-row copies of the old weights


# ---------------------------------------------------------------------------------------------
# Merging: W' = W + scale * B @ A, a plain model with no LoRA left
# ---------------------------------------------------------------------------------------------


def merged_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The state dict of the plain model with adapter `name` merged (keys without `.base`, no LoRA)."""
    _require(model, name)
    out = dict(model.state_dict())
    for full, m in lora_layers(model):
        prefix = f"{full}." if full else ""
        for key in [k for k in out if k.startswith(prefix + "lora_")]:
            del out[key]
        w = out.pop(prefix + "base.weight")
        if name in m.lora_A:
            w = (w.float() + m.delta_weight(name).detach()).to(w.dtype)
        out[prefix + "weight"] = w
        if prefix + "base.bias" in out:
            out[prefix + "bias"] = out.pop(prefix + "base.bias")
    return out


def merge_lora(model: nn.Module, name: str, inplace: bool = False) -> nn.Module:
    """A plain model (LoRALinear -> nn.Linear holding W + scale * B @ A of adapter `name`), with every
    parameter trainable again. By default the LoRA model is left untouched and a copy is returned."""
    _require(model, name)
    if not inplace:
        model = copy.deepcopy(model)
    for full, m in lora_layers(model):
        linear = m.base
        if name in m.lora_A:
            with torch.no_grad():
                linear.weight.copy_((linear.weight.float() + m.delta_weight(name)).to(linear.weight.dtype))
        parent_name, _, attr = full.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, linear)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------------
# Files: <folder>/adapter.safetensors holds only the adapter; its lora config rides in the
# safetensors metadata, so the file alone can recreate the adapter. Never pickle.
# ---------------------------------------------------------------------------------------------


def save_adapter(folder: str | os.PathLike, model: nn.Module, name: str, lora_config: dict | None = None) -> Path:
    """Write folder/adapter.safetensors atomically (tmp file + os.replace). The caller writes config.json
    (put `lora_config` there, e.g. under "lora"). lora_config defaults to `lora_config(model, name)`."""
    from safetensors.torch import save_file

    actual = _lora_config_of(model, name)
    config = dict(actual if lora_config is None else lora_config)
    for key in ("name", "rank", "alpha", "targets"):
        if key not in config:
            raise AdapterError(f"lora_config needs a {key!r} entry (got keys {sorted(config)})")
    if config["rank"] != actual["rank"] or float(config["alpha"]) != actual["alpha"]:
        raise AdapterError(f"lora_config says rank={config['rank']}, alpha={config['alpha']} but adapter "
                           f"{name!r} has rank={actual['rank']}, alpha={actual['alpha']}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    with atomic_path(folder / ADAPTER_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "lora_config": json.dumps(config)})
    return folder / ADAPTER_FILE


def read_adapter_file(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, lora config from the file's metadata or None)."""
    from safetensors import safe_open

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise AdapterError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise AdapterError(f"{path}: unreadable safetensors file ({e})") from None
    config = json.loads(meta["lora_config"]) if "lora_config" in meta else None
    return tensors, config


def add_adapter_weights(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], lora_config: dict) -> None:
    """Add adapter `name` holding `tensors` (as adapter_state_dict gives them), shaped by `lora_config` ({"rank",
    "alpha", "targets"}), frozen and inactive: which adapter runs is left as it was (a server adds one while others
    decode). On a mismatch the model is left as it was and AdapterError names the offending tensor."""
    _add_adapter(model, name, int(lora_config["rank"]), float(lora_config["alpha"]), lora_config["targets"], 0.0)
    for p in lora_parameters(model, name):
        p.requires_grad_(False)
    try:
        load_adapter_state_dict(model, name, tensors)
    except AdapterError:
        remove_adapter(model, name)
        raise


def load_adapter(folder: str | os.PathLike, model: nn.Module, name: str | None = None,
                 lora_config: dict | None = None) -> str:
    """Load folder/adapter.safetensors into adapter `name` (default: the name saved in the file).

    If the model does not have that adapter yet it is created from the lora config (argument, else the
    file's metadata) and left frozen and inactive: call set_adapter / mark_trainable as needed.
    Returns the adapter's name."""
    tensors, saved = read_adapter_file(folder)
    config = lora_config or saved
    name = name or (config or {}).get("name")
    if name is None:
        raise AdapterError(f"{folder}: no adapter name given and none saved in {ADAPTER_FILE}")
    try:
        if name in adapters(model):
            load_adapter_state_dict(model, name, tensors)
        elif config is None:
            raise AdapterError(f"model has no adapter {name!r} and no lora config to create it")
        else:
            add_adapter_weights(model, name, tensors, config)
    except AdapterError as e:
        raise AdapterError(f"{Path(folder) / ADAPTER_FILE}: {e}") from None
    return name


__all__ = [
    "ADAPTER_FILE", "DEFAULT_TARGETS", "AdapterError", "LoRALinear", "add_adapter_weights", "add_lora",
    "adapter_state_dict",
    "adapters", "load_adapter", "load_adapter_state_dict", "lora_config", "lora_layers", "lora_parameters",
    "mark_trainable", "merge_lora", "merged_state_dict", "read_adapter_file", "remove_adapter", "save_adapter",
    "set_adapter", "set_row_adapters", "use_adapter",
]
