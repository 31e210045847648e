"""Linear layers for fast CPU inference: the engine's inference copy swaps its nn.Linear layers for these.

A decode step reads every weight once per token, so on a CPU it is bound by how fast the linears stream their
weights from memory. Two kernels, picked per call by the number of rows (tokens) in it:
- prefill and batches of more than 4 rows: oneDNN with the weight pre-packed in its blocked layout
  (torch.ops.mkldnn._linear_pointwise, what torch.compile emits for CPU linears with freezing);
- 1 to 4 rows of bf16 (decode steps): palmchat's own kernel (decode_bf16.c), on CPUs with AVX512-BF16. It reads
  each thread's rows of W as one stream in memory order, which draws more bandwidth from DRAM than oneDNN's blocked
  layout (measured in benchmarks/README.md). It is built by setup.py where possible; without it oneDNN serves
  every call.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import nn

from palmchat.kernels.loader import load
from palmchat.utils import cpu

MAX_KERNEL_ROWS = 4  # decode_bf16.c's MAX_ROWS; measured faster than oneDNN up to ~6 rows, so 4 keeps a margin


@functools.cache
def bf16_kernel() -> ctypes.CDLL | None:
    """The compiled decode_bf16.c, or None where it was not built or this CPU lacks AVX512-BF16 (as
    cpu.cpu_supports sees it, under PALMCHAT_MAX_CPU_ISA)."""
    library = load("palmchat.kernels._decode_bf16", "palmchat_linear_bf16_supported", "avx512_bf16")
    if library is None:
        return None
    library.palmchat_linear_bf16.restype = None
    library.palmchat_linear_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                             ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    library.palmchat_block_bf16.restype = ctypes.c_int
    library.palmchat_block_bf16.argtypes = [ctypes.c_void_p]  # a pointer to fused_block.BlockCall
    return library


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) with at most MAX_KERNEL_ROWS rows, weight (N, K) and bias (N,) or None, all bf16 on CPU -> (..., N):
    F.linear(x, weight, bias) through decode_bf16.c. Callers check bf16_kernel() first."""
    x = x.contiguous()
    rows, (out_features, in_features) = x.numel() // x.shape[-1], weight.shape
    if not 1 <= rows <= MAX_KERNEL_ROWS or weight.dtype != torch.bfloat16 or not weight.is_contiguous() or (
            bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous())):
        raise ValueError(f"linear_bf16: takes 1..{MAX_KERNEL_ROWS} rows and a contiguous bf16 weight and bias, got "
                         f"{rows} rows and a {weight.dtype} weight")
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.bfloat16)
    bf16_kernel().palmchat_linear_bf16(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                                       y.data_ptr(), rows, out_features, in_features)
    return y


class PackedLinear(nn.Module):
    """An nn.Linear for CPU inference (see the module docstring for its two kernels), with its bias if it has one.

    The packed tensor is opaque (no storage): this module cannot be saved, copied or moved to another device;
    rebuild it from the source weight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        weight = weight.detach().contiguous()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)  # plain attributes, not parameters
        self.plain = weight if weight.dtype == torch.bfloat16 and bf16_kernel() is not None else None
        self.bias = None if bias is None else bias.detach().to(weight.dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        few_rows = 0 < x.numel() <= MAX_KERNEL_ROWS * self.in_features
        if self.plain is not None and x.dtype == torch.bfloat16 and few_rows:
            return linear_bf16(x, self.plain, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(module: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear inside `module`, except those named in `skip`, by a PackedLinear (in place); returns
    `module`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in skip:
                setattr(parent, name, PackedLinear(child.weight, child.bias))
    return module


def onednn_only(*modules: nn.Module) -> None:
    """Switch the C kernels off in these modules (in place): every linear goes to oneDNN, and fused blocks
    (fused_block.py) run op by op. For measuring and testing one kernel against the other."""
    for module in modules:
        for child in module.modules():
            if isinstance(child, PackedLinear):
                child.plain = None


def can_pack(dtype: torch.dtype) -> bool:
    """oneDNN packing works on this build and CPU and gives the same numbers as F.linear. oneDNN reorders bf16
    weights only with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT and raises elsewhere; palmchat packs bf16 from the
    `avx512` level up (cpu.cpu_supports, under PALMCHAT_MAX_CPU_ISA), so below it (the rare AVX2 CPUs with
    AVX-NE-CONVERT included, which decode in fp32 by default) a bf16 inference copy keeps plain nn.Linear layers."""
    if dtype == torch.bfloat16 and not cpu.cpu_supports("avx512"):
        return False
    try:
        w, x = torch.randn(24, 16, dtype=dtype), torch.randn(8, 16, dtype=dtype)
        return torch.allclose(PackedLinear(w)(x).float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2)
    except (RuntimeError, AttributeError):
        return False


__all__ = ["PackedLinear", "pack_linears", "onednn_only", "can_pack", "bf16_kernel", "linear_bf16", "MAX_KERNEL_ROWS"]
