"""Linear layers for fast CPU inference: the engine's inference copy swaps its nn.Linear layers for these.

A decode step reads every weight once per token, so on a CPU it is bound by how fast the linears stream their
weights from memory. Two kernels, picked per call by the number of rows (tokens) in it:
- 1 to 4 rows of bf16 (decode steps; up to MAX_AVX2_ROWS on AVX2, a batch of them): palmchat's own C kernel, one
  per instruction set, the best the CPU runs chosen once per process (decode_kernel_level() says which; a line
  on stderr at first use too):
    avx512_bf16  decode_bf16.c, VDPBF16PS on the bf16 pairs (Zen 4 and later, Intel since Cooper Lake);
    avx2         decode_avx2.c, bf16 widened to fp32 in registers and fp32 FMAs (any x86-64 since ~2013).
- prefill and larger batches: oneDNN with the weight pre-packed in its blocked layout
  (torch.ops.mkldnn._linear_pointwise, what torch.compile emits for CPU linears with freezing). Below AVX-512
  oneDNN cannot pack bf16, so there a bf16 layer computes these in fp32 (the bf16 values widened, fp32 products
  and sums, one rounding to bf16: the numerics of every other path), since PyTorch's bf16 matmul is emulated;
  the weight is widened a band of rows at a time (banded_linear), so that its fp32 copy stays in the cache.
The C kernels read each thread's rows of W as one stream in memory order, which draws more bandwidth from DRAM
than oneDNN's blocked layout (measured in benchmarks/README.md). They are built by setup.py on x86-64 Linux;
without them (not built, or another architecture such as ARM, where none exists yet) oneDNN and PyTorch serve
every call, and the engine decodes in fp32 there by default (utils/device.decode_dtype).
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn

from palmchat.kernels.loader import load
from palmchat.utils import cpu

MAX_KERNEL_ROWS = 4  # decode_bf16.c's MAX_ROWS; measured faster than oneDNN up to ~6 rows, so 4 keeps a margin
# decode_avx2.c's gemv takes more rows (a batch of decode steps, a short prefill) in groups of 4, reading W once.
# With no oneDNN bf16 below AVX-512 the alternative is fp32 products of W widened at each call: the gemv is faster
# up to about this many rows on a cache-resident W, and several times faster on one read from memory
MAX_AVX2_ROWS = 64


# the C decode kernel of each CPU level (cpu.LEVELS), best first
DECODE_KERNELS = {"avx512_bf16": "palmchat.kernels._decode_bf16", "avx2": "palmchat.kernels._decode_avx2"}
KERNEL_NAMES = {"avx512_bf16": "decode_bf16.c (AVX512-BF16)", "avx2": "decode_avx2.c (AVX2 + FMA)"}


@functools.cache
def decode_kernel(level: str) -> ctypes.CDLL | None:
    """The compiled decode kernel of `level` (a key of DECODE_KERNELS), or None where it was not built or this CPU
    cannot run it (as cpu.cpu_supports sees it, under PALMCHAT_MAX_CPU_ISA). Both export the same two functions:
    palmchat_linear_bf16 and palmchat_block_bf16 (fused_block.py)."""
    if level not in DECODE_KERNELS:
        raise ValueError(f"no decode kernel for CPU level {level!r}: there are {', '.join(DECODE_KERNELS)}")
    library = load(DECODE_KERNELS[level], "palmchat_linear_bf16_supported", level)
    if library is None:
        return None
    library.palmchat_linear_bf16.restype = None
    library.palmchat_linear_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                             ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    library.palmchat_linear_q8.restype = None
    library.palmchat_linear_q8.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    library.palmchat_linear_q4.restype = None
    library.palmchat_linear_q4.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    library.palmchat_dequantize_q4.restype = None
    library.palmchat_dequantize_q4.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    library.palmchat_block_bf16.restype = ctypes.c_int
    library.palmchat_block_bf16.argtypes = [ctypes.c_void_p]  # a pointer to fused_block.BlockCall
    return library


@functools.cache
def decode_kernel_level() -> str | None:
    """The level of the decode kernel this process uses: the best of DECODE_KERNELS that loads, or None (then
    oneDNN and PyTorch serve every linear, and blocks run op by op). Says which on stderr, once."""
    level = next((level for level in DECODE_KERNELS if decode_kernel(level) is not None), None)
    print(f"palmchat: bf16 decode kernel: {KERNEL_NAMES[level] if level else 'none (PyTorch)'}"
          f" on a CPU of level {cpu.cpu_isa()}", file=sys.stderr, flush=True)
    return level


def bf16_kernel() -> ctypes.CDLL | None:
    """The decode kernel this process uses (decode_kernel_level()), or None."""
    level = decode_kernel_level()
    return None if level is None else decode_kernel(level)


def kernel_rows(level: str | None) -> int:
    """The most rows the decode kernel of `level` takes in one call."""
    return MAX_AVX2_ROWS if level == "avx2" else MAX_KERNEL_ROWS


def quantized_kernel_rows(dtype: torch.dtype) -> int:
    """The most rows an Int8Linear or Int4Linear of compute `dtype` sends to this process's decode kernel: none
    unless the weights are bf16 and a kernel is built."""
    return kernel_rows(decode_kernel_level()) if dtype == torch.bfloat16 and bf16_kernel() is not None else 0


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                level: str | None = None) -> torch.Tensor:
    """x (..., K) with at most MAX_KERNEL_ROWS rows (MAX_AVX2_ROWS for decode_avx2.c), weight (N, K) and bias (N,)
    or None, all bf16 on CPU -> (..., N): F.linear(x, weight, bias) through the C decode kernel of `level`
    (default: this process's, decode_kernel_level()). Callers check bf16_kernel() (or decode_kernel(level))
    first."""
    x = x.contiguous()
    rows, (out_features, in_features) = x.numel() // x.shape[-1], weight.shape
    level = level or decode_kernel_level()
    most = kernel_rows(level)
    if not 1 <= rows <= most or weight.dtype != torch.bfloat16 or not weight.is_contiguous() or (
            bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous())):
        raise ValueError(f"linear_bf16: takes 1..{most} rows and a contiguous bf16 weight and bias, got "
                         f"{rows} rows and a {weight.dtype} weight")
    kernel = None if level is None else decode_kernel(level)
    if kernel is None:
        raise ValueError(f"linear_bf16: no decode kernel for level {level or 'of this CPU'} (not built, or the CPU "
                         f"or PALMCHAT_MAX_CPU_ISA does not allow it)")
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.bfloat16)
    kernel.palmchat_linear_bf16(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                                y.data_ptr(), rows, out_features, in_features)
    return y


def _quantized_gemv(entry: str, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    level: str | None, weights_fit: bool, takes: str) -> torch.Tensor:
    """linear_q8's and linear_q4's call of the C kernel's `entry`: checks (`weights_fit`: the weight and scales are
    what `takes` says) and the call."""
    x = x.contiguous()
    rows, out_features = x.numel() // x.shape[-1], qweight.shape[0]
    level = level or decode_kernel_level()
    most = kernel_rows(level)
    kernel = None if level is None else decode_kernel(level)
    if (kernel is None or not 1 <= rows <= most or x.dtype != torch.bfloat16 or not weights_fit
            or (bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()))):
        raise ValueError(f"{entry}: takes 1..{most} bf16 rows, {takes}, a bf16 bias, and a decode kernel (level "
                         f"{level}); got {rows} {x.dtype} rows of {x.shape[-1]}, a {qweight.dtype} weight "
                         f"{tuple(qweight.shape)} and {scale.dtype} scales {tuple(scale.shape)}")
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.bfloat16)
    getattr(kernel, f"palmchat_{entry}")(x.data_ptr(), qweight.data_ptr(), scale.data_ptr(),
                                         None if bias is None else bias.data_ptr(), y.data_ptr(), rows, out_features,
                                         x.shape[-1])
    return y


def linear_q8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              level: str | None = None) -> torch.Tensor:
    """x (..., K) bf16 with at most as many rows as linear_bf16 takes, qweight (N, K) int8, scale (N,) and bias
    (N,) or None bf16 -> (..., N): Int8Linear's forward (F.linear of the dequantized weight, the bias added after
    the product's rounding) through the C decode kernel of `level` (default: this process's)."""
    fit = (qweight.dtype == torch.int8 and qweight.shape[1:] == x.shape[-1:] and qweight.is_contiguous()
           and scale.dtype == torch.bfloat16 and scale.shape == qweight.shape[:1])
    return _quantized_gemv("linear_q8", x, qweight, scale, bias, level, fit,
                           "a contiguous int8 weight and bf16 scales per row")


def linear_q4(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              level: str | None = None) -> torch.Tensor:
    """x (..., K) bf16 with at most as many rows as linear_bf16 takes, qweight (N, K/2) uint8 and scale (N, K/32)
    fp16 (Int4Linear's) and bias (N,) bf16 or None -> (..., N): Int4Linear's forward through the C decode kernel of
    `level` (default: this process's)."""
    k = x.shape[-1]
    fit = (k % Q4_BLOCK == 0 and qweight.dtype == torch.uint8 and qweight.shape[1:] == (k // 2,)
           and qweight.is_contiguous() and scale.dtype == torch.float16 and scale.is_contiguous()
           and scale.shape == (qweight.shape[0], k // Q4_BLOCK))
    return _quantized_gemv("linear_q4", x, qweight, scale, bias, level, fit,
                           f"a multiple of {Q4_BLOCK} features, a contiguous uint8 weight of half as many columns and "
                           f"fp16 scales per block of {Q4_BLOCK}")


class PackedLinear(nn.Module):
    """An nn.Linear for CPU inference (see the module docstring for its kernels), with its bias if it has one.

    The packed tensor is opaque (no storage): this module cannot be saved, copied or moved to another device;
    rebuild it from the source weight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        weight = weight.detach().contiguous()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        bf16 = weight.dtype == torch.bfloat16
        # plain attributes, not parameters. oneDNN's packed weight, or below AVX-512 for bf16 the weight itself
        onednn = not bf16 or cpu.cpu_supports("avx512")
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None) if onednn else None
        self.unpacked = None if onednn else weight
        self.plain = weight if bf16 and bf16_kernel() is not None else None  # for the C kernel, up to kernel_rows
        self.kernel_rows = MAX_KERNEL_ROWS if onednn else MAX_AVX2_ROWS
        self.bias = None if bias is None else bias.detach().to(weight.dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        few_rows = 0 < x.numel() <= self.kernel_rows * self.in_features
        if self.plain is not None and x.dtype == torch.bfloat16 and few_rows:
            return linear_bf16(x, self.plain, self.bias)
        if self.packed is None:  # bf16 below AVX-512: fp32 products of the bf16 values, rounded once
            return banded_linear(x, lambda band: self.unpacked[band].float(), self.out_features, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


BAND_BYTES = 4 << 20  # banded_linear's widened copy of a band of W: fits a core's share of the L3


def banded_linear(x: torch.Tensor, weight_rows, out_features: int, bias: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x @ W^T (+ bias) computed in `dtype` (fp32: rounded once to x's dtype), where `weight_rows(band)` gives rows
    `band` of W (widened from bf16, or dequantized from int8 or 4 bits). W is widened ~BAND_BYTES of rows at a time,
    so that each band is still in the cache when the product reads it: widening a large W whole would write the
    copy to memory and read it back (benchmarks/README.md: prefill below AVX-512)."""
    xd = x.to(dtype)
    rows = max(16, BAND_BYTES // (4 * x.shape[-1]))
    y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype)
    for start in range(0, out_features, rows):
        band = slice(start, start + rows)
        y[..., band] = F.linear(xd, weight_rows(band).to(dtype), None if bias is None else bias[band].to(dtype))
    return y


INT8_KERNEL_ROWS = 8  # torch's int8 GEMV beats widening the weight up to a few rows (a decode step, a small batch)


class Int8Linear(nn.Module):
    """An nn.Linear whose weight is held as int8 with one scale per output row (symmetric, rounded to nearest:
    ``W ~ q * scale``, ``|q| <= 127``), for decoding where a step is bound by memory bandwidth: half the bytes of
    bf16, as llama.cpp's Q8_0 (which scales blocks of 32 instead of rows). A few bf16 rows (a decode step) go
    through palmchat's C decode kernel (linear_q8) where it is built; without it, up to INT8_KERNEL_ROWS rows run
    PyTorch's weight-only int8 kernel (``torch._weight_int8pack_mm``, gpt-fast's), which widens the int8 values in
    registers (its CPU kernel reads the input dimension in steps of 16 and returns garbage otherwise, so other
    layers take the other path); longer inputs (a prefill) widen the weight to x's dtype a band of rows at a time
    (banded_linear; below AVX-512, where PyTorch emulates bf16 matmuls, to fp32). The
    scales are kept in the compute dtype, so every path multiplies by the same numbers."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach().float()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        scale = w.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127  # an all-zero row stays zero
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(weight.dtype))
        self.bias = None if bias is None else bias.detach().to(weight.dtype).contiguous()
        self.kernel_rows = quantized_kernel_rows(weight.dtype)  # rows linear_q8 takes here

    def dequantized(self, rows: slice = slice(None)) -> torch.Tensor:
        """The weight these int8 values and scales stand for (or those `rows` of it), in the scales' dtype."""
        return self.qweight[rows].to(self.scale.dtype) * self.scale[rows, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if 0 < rows <= self.kernel_rows and x.dtype == torch.bfloat16:
            return linear_q8(x, self.qweight, self.scale, self.bias)
        if 0 < rows <= INT8_KERNEL_ROWS and x.dtype == self.scale.dtype and self.in_features % 16 == 0:
            y = torch._weight_int8pack_mm(x.reshape(rows, self.in_features).contiguous(), self.qweight, self.scale)
            y = y.view(*x.shape[:-1], self.out_features)
        elif x.dtype == torch.bfloat16 and not cpu.cpu_supports("avx512"):  # PyTorch emulates bf16 matmuls there
            y = banded_linear(x, lambda band: self.dequantized(band).float(), self.out_features)
        else:  # a band of rows dequantized at a time, as below AVX-512, but multiplied in x's dtype
            y = banded_linear(x, self.dequantized, self.out_features, dtype=x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


Q4_BLOCK = 32  # elements per scale of an Int4Linear weight (llama.cpp's Q4_0 block)


def quantize_q4_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight, K % Q4_BLOCK == 0 -> (qweight (N, K/2) uint8, scale (N, K/32) fp16), bit for bit what
    llama.cpp's quantize_row_q4_0_ref writes into its blocks' `qs` and `d`: per block of 32, d = -(the value of
    largest magnitude, the first if tied) / 8, q = min(15, trunc(w / d + 8.5)) in fp32 arithmetic; byte j of a
    block holds element j in its low nibble and element j + 16 in its high one. Element q stands for (q - 8) * d."""
    rows, cols = weight.shape
    if cols % Q4_BLOCK:
        raise ValueError(f"4-bit weights take a multiple of {Q4_BLOCK} input features, not {cols}")
    blocks = weight.detach().float().reshape(rows, cols // Q4_BLOCK, Q4_BLOCK)
    largest = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # (rows, blocks, 1), signed
    d = largest / -8
    inverse = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = (blocks * inverse + 8.5).to(torch.int32).clamp_(max=15).to(torch.uint8)  # >= 0: trunc is floor here
    half = Q4_BLOCK // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return packed.reshape(rows, cols // 2).contiguous(), d.squeeze(-1).to(torch.float16).contiguous()


def dequantize_q4_0(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """quantize_q4_0's (qweight, scale) -> the (N, K) weight they stand for, (q - 8) * d: exact in fp32, or that
    rounded to `dtype` (through the decode kernel where one is built: several times faster than tensor ops)."""
    rows = qweight.shape[0]
    kernel = bf16_kernel()
    if (kernel is not None and dtype in (torch.float32, torch.bfloat16) and qweight.is_contiguous()
            and scale.is_contiguous()):
        out = torch.empty(rows, 2 * qweight.shape[1], dtype=dtype)
        kernel.palmchat_dequantize_q4(qweight.data_ptr(), scale.data_ptr(), out.data_ptr(), rows, out.shape[1],
                                      dtype == torch.bfloat16)
        return out
    packed = qweight.reshape(rows, -1, Q4_BLOCK // 2)
    q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float() - 8  # (rows, blocks, 32) in element order
    return (q * scale.float()[..., None]).reshape(rows, -1).to(dtype)


class Int4Linear(nn.Module):
    """An nn.Linear whose weight is held as 4 bits per element with an fp16 scale per block of 32 along the input
    (llama.cpp's Q4_0, quantize_q4_0): ~0.56 bytes per weight, a quarter of bf16's, so a decode step that streams
    its weights from memory reads a quarter as many, for a larger loss of precision than Int8Linear's. A few bf16
    rows (a decode step) go through palmchat's C decode kernel (linear_q4), which sums per block the exact products
    of x's bf16 and q - 8 in fp32 and scales that sum; other inputs (a prefill, or no kernel) multiply the
    dequantized weight a band of rows at a time (banded_linear): in x's dtype with AVX-512, in fp32 below it. The C
    kernel and the fp32 path round the same fp32 sum once; a bias is added after that rounding (as Int8Linear's)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        qweight, scale = quantize_q4_0(weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else bias.detach().to(weight.dtype).contiguous()
        self.kernel_rows = quantized_kernel_rows(weight.dtype)  # rows linear_q4 takes here

    def dequantized(self, rows: slice = slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight these 4-bit values and scales stand for (or those `rows` of it), in fp32 (exact) or `dtype`."""
        return dequantize_q4_0(self.qweight[rows], self.scale[rows], dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if 0 < rows <= self.kernel_rows and x.dtype == torch.bfloat16:
            return linear_q4(x, self.qweight, self.scale, self.bias)
        native = x.dtype == torch.bfloat16 and cpu.cpu_supports("avx512")  # a prefill: oneDNN's bf16 product
        dtype = x.dtype if native else torch.float32
        y = banded_linear(x, lambda band: self.dequantized(band, dtype), self.out_features, dtype=dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _replace_linears(module: nn.Module, skip: tuple[str, ...], make) -> nn.Module:
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in skip:
                setattr(parent, name, make(child.weight, child.bias))
    return module


QUANTIZATIONS = ("int8", "int4")


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, kind: str) -> nn.Module:
    """An Int8Linear (kind "int8") or Int4Linear ("int4") of this weight; "int4" falls back to int8 for a layer
    whose input features are not a multiple of Q4_BLOCK."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, not {kind!r}")
    if kind == "int4" and weight.shape[1] % Q4_BLOCK == 0:
        return Int4Linear(weight, bias)
    return Int8Linear(weight, bias)


def quantize_linears(module: nn.Module, skip: tuple[str, ...] = (), kind: str = "int8") -> nn.Module:
    """Replace every nn.Linear inside `module`, except those named in `skip`, by quantized_linear(.., kind) (in
    place); returns `module`."""
    return _replace_linears(module, skip, lambda weight, bias: quantized_linear(weight, bias, kind))


def pack_linears(module: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear inside `module`, except those named in `skip`, by a PackedLinear (in place); returns
    `module`."""
    return _replace_linears(module, skip, PackedLinear)


def onednn_only(*modules: nn.Module) -> None:
    """Switch the C kernels off in these modules (in place): every linear goes to oneDNN (below AVX-512, a bf16
    one to fp32 products in PyTorch; an int8 one to PyTorch's int8 kernel), and fused blocks (fused_block.py) run
    op by op. For measuring and testing one kernel against the other."""
    for module in modules:
        for child in module.modules():
            if isinstance(child, PackedLinear):
                child.plain = None
            elif isinstance(child, (Int8Linear, Int4Linear)):
                child.kernel_rows = 0


def can_pack(dtype: torch.dtype) -> bool:
    """PackedLinear works on this build and CPU for `dtype` and gives the same numbers as F.linear. oneDNN reorders
    bf16 weights only with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT and raises elsewhere, so palmchat packs bf16 from
    the `avx512` level up (cpu.cpu_supports, under PALMCHAT_MAX_CPU_ISA); below it a bf16 PackedLinear is worth
    having only with a decode kernel (decode_avx2.c), which serves its decode steps while fp32 serves the rest.
    Without either, a bf16 inference copy keeps plain nn.Linear layers."""
    if dtype == torch.bfloat16 and not cpu.cpu_supports("avx512") and bf16_kernel() is None:
        return False
    try:
        w, x = torch.randn(24, 16, dtype=dtype), torch.randn(8, 16, dtype=dtype)
        return torch.allclose(PackedLinear(w)(x).float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2)
    except (RuntimeError, AttributeError):
        return False


__all__ = ["PackedLinear", "pack_linears", "Int8Linear", "Int4Linear", "quantize_linears", "quantized_linear",
           "QUANTIZATIONS", "Q4_BLOCK", "quantize_q4_0", "dequantize_q4_0", "INT8_KERNEL_ROWS", "onednn_only",
           "can_pack", "bf16_kernel", "decode_kernel", "decode_kernel_level", "linear_bf16", "linear_q8", "linear_q4",
           "MAX_KERNEL_ROWS", "MAX_AVX2_ROWS", "DECODE_KERNELS", "KERNEL_NAMES"]
