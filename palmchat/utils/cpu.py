"""What this CPU can run (palmchat/kernels/loader.py loads the C kernels that need it). Nothing here imports torch.

Every CPU-dependent choice in palmchat asks `cpu_supports(level)`: its own C kernels, bf16 autocast and the
inference dtype, SDPA against the blocked attention kernel, oneDNN's packed bf16 linears. The levels, lowest first:

    avx2         AVX2 and FMA (any x86-64 CPU since ~2013): decode_avx2.c, so bf16 decoding but fp32 training
    avx512       AVX-512 F, BW, VL and DQ (what oneDNN's bf16 weight reorder needs)
    avx512_bf16  AVX-512 BF16 (decode_bf16.c, attention_bf16.c; bf16 matmuls several times faster than fp32)
    amx          AMX tiles for bf16 (attention_bf16.c's tile products; PyTorch's SDPA on oneDNN brgemm)

Below every level ("baseline": ARM such as Apple and Graviton, or a pre-AVX2 x86 CPU) palmchat loads no C kernel
and PyTorch's own kernels serve everything, in fp32 by default.

The environment variable PALMCHAT_MAX_CPU_ISA caps the level palmchat believes the CPU has, as oneDNN's
ONEDNN_MAX_CPU_ISA does for oneDNN: `PALMCHAT_MAX_CPU_ISA=avx2` makes an AMX machine take every fallback an
AVX2-only CPU takes, so those paths can be tested anywhere. The flags and the variable are read once per process.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

MAX_ISA_VARIABLE = "PALMCHAT_MAX_CPU_ISA"
# each level's /proc/cpuinfo flags, on top of the levels before it
LEVEL_FLAGS = {
    "avx2": ("avx2", "fma"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "avx512_bf16": ("avx512_bf16",),
    "amx": ("amx_tile", "amx_bf16"),
}
LEVELS = tuple(LEVEL_FLAGS)
BELOW_ALL_LEVELS = "baseline"  # none of the levels detected: another architecture or OS, or a pre-AVX2 CPU


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere, where palmchat detects nothing."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):  # the first processor's; all cores of a machine report the same
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def detected_isa() -> str:
    """The highest level whose flags (and those of every level below it) this CPU reports, ignoring the cap."""
    level = BELOW_ALL_LEVELS
    for name, flags in LEVEL_FLAGS.items():
        if not all(flag in cpu_flags() for flag in flags):
            break
        level = name
    return level


def max_isa() -> str | None:
    """The cap set by PALMCHAT_MAX_CPU_ISA, or None where it is unset or empty."""
    value = os.environ.get(MAX_ISA_VARIABLE, "").strip().lower()
    if not value:
        return None
    if value not in LEVELS:
        raise ValueError(f"{MAX_ISA_VARIABLE}={os.environ[MAX_ISA_VARIABLE]!r} is not one of "
                         f"{', '.join(LEVELS)} (lowest first), or unset for what the CPU has")
    return value


@functools.cache
def cpu_isa() -> str:
    """The level palmchat uses: what the CPU has (detected_isa), at most PALMCHAT_MAX_CPU_ISA. Raises ValueError
    for an unknown PALMCHAT_MAX_CPU_ISA."""
    detected, cap = detected_isa(), max_isa()
    if cap is None or _rank(detected) <= _rank(cap):
        return detected
    return cap


def cpu_supports(level: str) -> bool:
    """Whether palmchat may use instructions of `level` (one of LEVELS) on this CPU, under the cap."""
    if level not in LEVELS:
        raise ValueError(f"unknown CPU level {level!r}: expected one of {', '.join(LEVELS)}")
    return _rank(cpu_isa()) >= _rank(level)


def _rank(level: str) -> int:
    return -1 if level == BELOW_ALL_LEVELS else LEVELS.index(level)


__all__ = ["MAX_ISA_VARIABLE", "LEVELS", "LEVEL_FLAGS", "BELOW_ALL_LEVELS", "cpu_flags", "detected_isa", "max_isa",
           "cpu_isa", "cpu_supports"]
