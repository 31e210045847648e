"""Device and precision choice: which device, whether to autocast to bf16, the inference dtype, and the
allocator setting training commands take."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import sys

import torch

from palmchat.utils import cpu


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def keep_freed_memory() -> bool:
    """Ask glibc to keep the memory a training step frees, for the next step. By default it serves each buffer
    above 32 MB (an activation of batch 16 x 256 tokens x 4096 features in bf16, say) with a fresh mmap and unmaps
    it on free, so every step page-faults its large activations in again: a fifth of the demo's pretraining step,
    for a few hundred MB more resident memory that stays flat (docs/decisions.md). jemalloc and tcmalloc, which
    PyTorch's CPU tuning guide suggests preloading, keep freed memory the same way. Process-wide: call it in
    training commands only. Returns whether the setting was taken (glibc on Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 (and AMX, above it) make bf16 matmuls several times faster than fp32; without them bf16 is
    emulated, so 'auto' keeps fp32. Obeys PALMCHAT_MAX_CPU_ISA (cpu.py)."""
    return cpu.cpu_supports("avx512_bf16")


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """'auto' -> bf16 where the hardware runs it fast, else fp32 (None = no autocast)."""
    if setting == "fp32":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting != "auto":
        raise ValueError(f"--dtype must be auto, bf16 or fp32, not {setting!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def decode_dtype(setting: str) -> torch.dtype:
    """The dtype of the engine's inference copy for --dtype auto/bf16/fp32: as autocast_dtype on this machine's
    device, with fp32 spelled torch.float32. On a CPU with AVX2 but no AVX512-BF16, 'auto' is bf16 too where
    palmchat's AVX2 decode kernel (kernels/decode_avx2.c) was built: a decode step reads every weight once, and
    bf16 weights widened in registers are half the bytes of fp32 (benchmarks/bench_decode_avx2.py). Training there
    stays fp32 (autocast_dtype), since its bf16 matmuls would be emulated."""
    device = pick_device()
    dtype = autocast_dtype(setting, device)
    if dtype is None and setting == "auto" and device.type == "cpu" and _avx2_decode_kernel():
        return torch.bfloat16
    return dtype or torch.float32


def _avx2_decode_kernel() -> bool:
    """The CPU runs AVX2 + FMA (under PALMCHAT_MAX_CPU_ISA) and decode_avx2.c was built. Looked up by name, not
    imported: utils sits below kernels (docs/architecture.md)."""
    return cpu.cpu_supports("avx2") and importlib.util.find_spec("palmchat.kernels._decode_avx2") is not None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
