"""Loading palmchat's optional C kernels (built by setup.py where a compiler is found; see decode_bf16.c and
attention_bf16.c). Each kernel is a plain shared library called through ctypes, so nothing here imports torch."""

from __future__ import annotations

import ctypes
import importlib.util

from palmchat.utils.cpu import cpu_supports


def load(module: str, supported: str, needs: str) -> ctypes.CDLL | None:
    """The compiled extension `module` (e.g. "palmchat.kernels._attention_bf16"), or None where the CPU (under the
    cap) lacks level `needs`, the extension was not built or does not load, or its own function `supported` says
    this CPU cannot run it."""
    if not cpu_supports(needs):
        return None
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    try:
        library = ctypes.CDLL(spec.origin)
    except OSError:  # e.g. built for another machine
        return None
    return library if getattr(library, supported)() else None
