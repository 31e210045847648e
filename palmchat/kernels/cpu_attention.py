"""Causal attention for bf16 training on CPUs with AMX tiles, in C (attention_bf16.c).

PyTorch's CPU flash kernel is slow in the backward pass, a large part of a whole training step at the demo's
shapes (multi-query attention, 8 query heads on one K/V head). attention_bf16.c runs the tile products of
FlashAttention-2 on AMX tiles, several times faster backward, with the same numerics up to the order of fp32
sums (the choice of attention kernel per CPU and its measurements: docs/decisions.md). Forward and backward are
torch.library custom ops, so torch.compile keeps each as one call in the compiled graph.

Used by palm.attention where `available(q)`; elsewhere SDPA or blocked_attention.py serve the training path.
"""

from __future__ import annotations

import ctypes

import torch

from palmchat.kernels.loader import load
from palmchat.utils import cpu


class Forward(ctypes.Structure):
    """attention_bf16.c's Forward: the shapes, pointers and strides of one call."""

    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "n_heads", "n_kv_heads", "seq", "head_dim")]
    _fields_ += [("scale", ctypes.c_float)]
    _fields_ += [(name, ctypes.c_void_p) for name in ("q", "k", "v")]
    _fields_ += [(name, ctypes.c_int64 * 3) for name in ("q_strides", "k_strides", "v_strides")]
    _fields_ += [("use_amx", ctypes.c_int64), ("out", ctypes.c_void_p), ("lse", ctypes.c_void_p)]


class Backward(ctypes.Structure):
    """attention_bf16.c's Backward: the shapes, pointers and strides of one call."""

    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "n_heads", "n_kv_heads", "seq", "head_dim")]
    _fields_ += [("scale", ctypes.c_float)]
    _fields_ += [(name, ctypes.c_void_p) for name in ("q", "k", "v", "out", "grad_out")]
    _fields_ += [(name, ctypes.c_int64 * 3) for name in
                 ("q_strides", "k_strides", "v_strides", "out_strides", "grad_out_strides")]
    _fields_ += [("lse", ctypes.c_void_p), ("lse_strides", ctypes.c_int64 * 3), ("use_amx", ctypes.c_int64)]
    _fields_ += [(name, ctypes.c_void_p) for name in ("grad_q", "grad_k", "grad_v")]


def _load_kernel() -> tuple[ctypes.CDLL, bool] | None:
    """(the compiled attention_bf16.c, whether it may use AMX tiles), or None where it was not built or this CPU
    lacks AVX512-BF16 (both as cpu.cpu_supports sees it, under PALMCHAT_MAX_CPU_ISA)."""
    library = load("palmchat.kernels._attention_bf16", "palmchat_attention_bf16_supported", "avx512_bf16")
    if library is None:
        return None
    for function in (library.palmchat_attention_forward_bf16, library.palmchat_attention_backward_bf16):
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p]
    # the C check also asks Linux for the AMX tile state, so it runs only where the cap allows AMX
    return library, cpu.cpu_supports("amx") and bool(library.palmchat_attention_amx_supported())


# Loaded at import, not on first use: torch.compile traces palm.attention and cannot trace ctypes.
KERNEL = _load_kernel()
# Without AMX the products run on AVX512-BF16, several times slower: no faster than blocked_attention.py there
# (docs/decisions.md).
ON_THIS_CPU = KERNEL is not None and KERNEL[1]


def available(q: torch.Tensor) -> bool:
    """Whether the training path should take causal_attention for q (B, H, T, D): bf16 on a CPU with AMX tiles
    and a head dim the kernel takes."""
    return ON_THIS_CPU and q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-1] % 16 == 0


def _strides(x: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * 3)(*x.stride()[:3])


def _use_amx(head_dim: int) -> bool:
    return KERNEL[1] and head_dim % 32 == 0


def _out_of_memory(what: str, q: torch.Tensor) -> MemoryError:
    B, H, T, D = q.shape
    return MemoryError(f"attention {what}: out of memory for {B} x {T} tokens, {H} heads of {D}")


@torch.library.custom_op("palmchat::causal_attention_forward", mutates_args=())
def causal_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    (B, H, T, D), Hkv = q.shape, k.shape[1]
    out, lse = torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, H, T, dtype=torch.float32)
    call = Forward(batch=B, n_heads=H, n_kv_heads=Hkv, seq=T, head_dim=D, scale=D ** -0.5,
                   q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
                   q_strides=_strides(q), k_strides=_strides(k), v_strides=_strides(v),
                   use_amx=_use_amx(D), out=out.data_ptr(), lse=lse.data_ptr())
    if KERNEL[0].palmchat_attention_forward_bf16(ctypes.byref(call)):
        raise _out_of_memory("forward", q)
    return out, lse


@causal_attention_forward.register_fake
def _(q, k, v):
    B, H, T, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("palmchat::causal_attention_backward", mutates_args=())
def causal_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                              lse: torch.Tensor,
                              grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, grad_out = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, out, grad_out))
    (B, H, T, D), Hkv = q.shape, k.shape[1]
    grad_q, grad_k, grad_v = torch.empty_like(q, memory_format=torch.contiguous_format), k.new_empty(k.shape), \
        v.new_empty(v.shape)
    call = Backward(batch=B, n_heads=H, n_kv_heads=Hkv, seq=T, head_dim=D, scale=D ** -0.5,
                    q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), grad_out=grad_out.data_ptr(),
                    q_strides=_strides(q), k_strides=_strides(k), v_strides=_strides(v), out_strides=_strides(out),
                    grad_out_strides=_strides(grad_out), lse=lse.data_ptr(), lse_strides=_strides(lse),
                    use_amx=_use_amx(D),
                    grad_q=grad_q.data_ptr(), grad_k=grad_k.data_ptr(), grad_v=grad_v.data_ptr())
    if KERNEL[0].palmchat_attention_backward_bf16(ctypes.byref(call)):
        raise _out_of_memory("backward", q)
    return grad_q, grad_k, grad_v


@causal_attention_backward.register_fake
def _(q, k, v, out, lse, grad_out):
    return torch.empty_like(q, memory_format=torch.contiguous_format), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _autograd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return causal_attention_backward(q, k, v, out, lse, grad_out)


causal_attention_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: (B, H, T, D), k and v: (B, Hkv, T, D), all bf16 on CPU -> (B, H, T, D): causal softmax attention, scale
    1/sqrt(D). Callers check `available(q)` first."""
    return causal_attention_forward(q, k, v)[0]
