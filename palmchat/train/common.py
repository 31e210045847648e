"""Small helpers every training script uses: the arguments every stage takes, the LR schedule, the optimizer and
its step, metrics as JSONL and a PNG plot, the policy's checkpoints. Functions and a dataclass, not a trainer class
(device and precision: palmchat/utils/device.py)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from palmchat.utils.args import arg
from palmchat.utils.jsonl import read_jsonl


@dataclass
class TrainArgs:
    """The arguments every training stage takes. A stage's dataclass subclasses this and adds its own fields; where
    its default or help text differs it redeclares the field (the field keeps its place here, first in the flags).
    `out` and `lr` have no default here: every stage sets its own."""

    out: str
    lr: float
    grad_clip: float = arg(1.0, "gradient norm clip; 0 = off")
    dtype: str = arg("auto", "auto (bf16 where fast), bf16 or fp32", choices=["auto", "bf16", "fp32"])
    seed: int = arg(0, "random seed")
    device: str = arg("auto", "auto, cpu or cuda")
    tensorboard: bool = arg(False, "also log the metrics for TensorBoard in OUT/tensorboard")


def cosine_lr(step: int, max_steps: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup, then cosine decay to min_lr at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def optimizer_step(optimizer: torch.optim.Optimizer, params, max_norm: float, lr: float | None = None) -> torch.Tensor:
    """One update after the gradients are in (the caller runs backward, scaled for any accumulation): clip the
    gradient norm of `params` to max_norm, set the learning rate of every group when one is given, step, and clear
    the gradients. Returns the total gradient norm before clipping, for the metrics.

    `params` is named rather than read from the optimizer because the order of the tensors sets the rounding of
    the norm. max_norm <= 0 turns clipping off (`--grad-clip 0`), as in every stage's help."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class MetricsLog:
    """Appends one JSON object per line. On resume, rows after the resumed step are dropped so the
    file reads like one uninterrupted run. With `tensorboard`, every numeric value is also logged as a TensorBoard
    scalar beside the file (`tensorboard --logdir OUT`; needs the `tensorboard` extra)."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, tensorboard: bool = False):
        self.path = Path(path)
        rows = []
        if resume_step is not None and self.path.exists():
            rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install 'palmchat[tensorboard]'") \
                    from None
            self.writer = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=resume_step)

    def write(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, row.get("step", 0))
            self.writer.flush()


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike, keys: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), label=key, marker="o" if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def load_policy(base: str, lora_rank: int = 0, lora_alpha: float = 16.0, device: torch.device | str = "cpu",
                adapter_name: str = "policy", dtype: torch.dtype | None = None):
    """The model to fine-tune from a checkpoint: all weights trainable, or a fresh LoRA adapter on a frozen base.
    `dtype`: the training's autocast dtype (None: fp32). The weights train in fp32 (AdamW's master weights, and
    what a CPU without bf16 computes in), except that a LoRA run under bf16 autocast leaves a bf16 checkpoint's
    frozen base in bf16 (a Hugging Face model loads in its stored dtype): no fp32 copy of it, fp32 adapters.
    Returns (model, tokenizer, checkpoint config)."""
    from palmchat import checkpoint
    from palmchat.model.lora import add_lora, lora_parameters

    model, config, ckpt = checkpoint.load_model(base, device=device)
    tokenizer = checkpoint.load_tokenizer(ckpt)
    if not (lora_rank and dtype == torch.bfloat16):
        model.float()
    if lora_rank:
        add_lora(model, adapter_name, rank=lora_rank, alpha=lora_alpha)
        for p in lora_parameters(model, adapter_name):
            p.data = p.data.float()
    return model.train(), tokenizer, config


def save_policy(out, step: int, model, config: dict, base: str, lora_rank: int = 0, adapter_name: str = "policy",
                **kw):
    """Full weights, or (with LoRA) the adapter alone plus a pointer to its base checkpoint."""
    from palmchat import checkpoint
    from palmchat.model.lora import lora_config

    base_ckpt = checkpoint.resolve(base)
    if lora_rank:
        config = {**config, "lora": lora_config(model, adapter_name), "base": str(base_ckpt.resolve())}
    return checkpoint.save_checkpoint(out, step, model, config, base_ckpt / checkpoint.TOKENIZER_FILE,
                                      adapter=adapter_name if lora_rank else None, **kw)
