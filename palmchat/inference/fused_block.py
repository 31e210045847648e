"""Decode steps through a whole transformer block in one C call (decode_bf16.c's palmchat_block_bf16).

A decode step of the PaLM block in PyTorch is ~25 small ops (norm, projection, split, rotary, cache write,
attention, SwiGLU, two projections, residual sums); at one token per row each op costs more in dispatch than in
arithmetic, and on 2 CPU cores they took more time than streaming the weights (benchmarks/README.md). The engine's
bf16 inference copy (its linear weights bf16, int8 with a scale per row, or 4-bit) wraps each block in a
FusedBlock: decode steps of 1-4 rows (one new token each, into a KV cache) run in C, with the numerics of the
PyTorch bf16 path up to the order of fp32 additions; every other call (prefill, training, fp32, and any step while
a LoRA adapter is active in the block) runs the block itself.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from palmchat.kernels.cpu_linear import MAX_KERNEL_ROWS, Int4Linear, Int8Linear, PackedLinear, bf16_kernel
from palmchat.model.lora import LoRALinear
from palmchat.model.transformer import ParallelBlock, SequentialBlock


class BlockCall(ctypes.Structure):
    """decode_bf16.c's Block: the shapes and pointers of one call."""

    _fields_ = [(name, ctypes.c_int64) for name in
                ("rows", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "sequential", "rmsnorm")]
    _fields_ += [("eps", ctypes.c_float)]
    _fields_ += [(name, ctypes.c_void_p) for name in
                 ("x", "y", "norm", "ff_norm", "w_in", "w_gate_up", "w_attn_out", "w_ff_out", "k_cache", "v_cache")]
    _fields_ += [(name, ctypes.c_int64) for name in ("row_stride", "head_stride", "slot_stride")]
    _fields_ += [(name, ctypes.c_void_p) for name in ("positions", "cos", "sin", "b_in")]
    _fields_ += [(name, ctypes.c_void_p) for name in ("s_in", "s_gate_up", "s_attn_out", "s_ff_out")]
    _fields_ += [("q4", ctypes.c_int64)]  # bit i: weight i of w_in, w_gate_up, w_attn_out, w_ff_out is 4-bit


def kernel_weight(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The weight the C kernel reads and its scales (None for bf16), when `linear` is a PackedLinear with a plain
    bf16 weight, an Int8Linear of bf16 scales or an Int4Linear that the kernel serves, or a LoRA layer over one
    (whose base weight the kernel runs while none of its adapters is active); else None."""
    if isinstance(linear, LoRALinear):
        linear = linear.base
    if isinstance(linear, PackedLinear) and linear.plain is not None:
        return linear.plain, None
    if isinstance(linear, (Int8Linear, Int4Linear)) and linear.kernel_rows:
        return linear.qweight, linear.scale
    return None


class FusedBlock(nn.Module):
    def __init__(self, block: ParallelBlock | SequentialBlock):
        super().__init__()
        self.block = block
        c = block.config
        sequential = isinstance(block, SequentialBlock)
        norms = (block.attn_norm, block.ff_norm) if sequential else (block.norm, block.norm)
        linears = (block.qkv, block.gate_up) if sequential else (block.in_proj, block.in_proj)
        self._lora = [m for m in block.modules() if isinstance(m, LoRALinear)]
        weights = [kernel_weight(m) for m in (*linears, block.attn_out, block.ff_out)]
        self._weights = [n.weight for n in norms] + [t for pair in weights for t in pair if t is not None]  # kept alive
        self.call = BlockCall(dim=c.dim, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                              ffn_hidden=c.ffn_hidden, sequential=sequential, rmsnorm=c.norm == "rmsnorm",
                              eps=c.norm_eps)
        self.call.norm, self.call.ff_norm = (n.weight.data_ptr() for n in norms)
        call = self.call
        call.w_in, call.w_gate_up, call.w_attn_out, call.w_ff_out = (w.data_ptr() for w, _ in weights)
        call.s_in, call.s_gate_up, call.s_attn_out, call.s_ff_out = (
            None if s is None else s.data_ptr() for _, s in weights)
        call.q4 = sum(1 << i for i, (w, _) in enumerate(weights) if w.dtype == torch.uint8)
        if sequential and block.qkv.bias is not None:  # Qwen2's q, k and v biases
            self._weights.append(block.qkv.bias)
            self.call.b_in = block.qkv.bias.data_ptr()

    @staticmethod
    def fusable(block: nn.Module) -> bool:
        """The block is one the kernel implements (palmchat's own blocks, and Qwen2's biases on q, k and v: SwiGLU,
        full rotary, no other biases, no q/k norms, no sliding window, no two-norm parallel wiring, none of Gemma's
        norms or scales), every weight of it is in bf16 (or int8 with bf16 scales, or 4-bit) and the kernel serves every
        linear. Any other block runs its PyTorch forward, with the same numerics."""
        if not isinstance(block, (ParallelBlock, SequentialBlock)) or bf16_kernel() is None:
            return False
        c = block.config
        if (c.ffn != "swiglu" or (c.qkv_bias and not isinstance(block, SequentialBlock)) or c.attn_out_bias
                or c.ffn_bias or c.norm_bias or c.qk_norm or c.rotary_dim != c.head_dim or c.sliding_window is not None
                or c.norm_offset or c.post_norms or c.attn_scale is not None
                or (isinstance(block, SequentialBlock) and block.parallel)):
            return False
        sequential = isinstance(block, SequentialBlock)
        linears = (block.qkv, block.gate_up) if sequential else (block.in_proj,)
        norms = (block.attn_norm, block.ff_norm) if sequential else (block.norm,)
        return (all(kernel_weight(m) is not None for m in (*linears, block.attn_out, block.ff_out))
                and all(n.weight is not None and n.weight.dtype == torch.bfloat16 and n.weight.is_contiguous()
                        for n in norms))

    def forward(self, x, rope, positions, cache, layer, padding_mask):
        B, T, _ = x.shape
        cos, sin = rope  # (B, 1, 1, D) rows of the model's tables, in the copy's dtype
        if (cache is None or padding_mask is not None or T != 1 or not 1 <= B <= MAX_KERNEL_ROWS
                or kernel_weight(self.block.attn_out) is None  # cpu_linear.onednn_only switched the C kernels off
                or any(m.active_adapter is not None or m.row_slots is not None for m in self._lora)
                or x.dtype != torch.bfloat16 or cache.k.dtype != torch.bfloat16 or cos.dtype != torch.bfloat16
                or cache.k.stride() != cache.v.stride() or cache.k.stride(-1) != 1):
            return self.block(x, rope, positions, cache, layer, padding_mask)
        if layer == 0 and int(positions.max()) >= cache.max_len:  # every layer writes the same positions
            raise ValueError(f"KV cache full: position {int(positions.max())} is past its {cache.max_len} slots")
        x, cos, sin, positions = x.contiguous(), cos.contiguous(), sin.contiguous(), positions.contiguous()
        y = torch.empty_like(x)
        # cache.k[layer] and cache.v[layer] (B, Hkv, S_max, D), addressed without making views (one op each)
        layer_offset = layer * cache.k.stride(0) * cache.k.element_size()
        call = BlockCall.from_buffer_copy(self.call)  # a copy per call: the module stays safe to share across threads
        call.rows, call.x, call.y, call.positions, call.cos, call.sin = (
            B, x.data_ptr(), y.data_ptr(), positions.data_ptr(), cos.data_ptr(), sin.data_ptr())
        call.k_cache, call.v_cache = cache.k.data_ptr() + layer_offset, cache.v.data_ptr() + layer_offset
        call.row_stride, call.head_stride, call.slot_stride = cache.k.stride()[1:4]
        if bf16_kernel().palmchat_block_bf16(ctypes.byref(call)) != 0:
            raise MemoryError("palmchat_block_bf16: out of memory for its scratch buffers")
        return y


def fuse_blocks(model: nn.Module) -> nn.Module:
    """Wrap every fusable block of `model.blocks` in a FusedBlock (in place); returns `model`."""
    for i, block in enumerate(model.blocks):
        if FusedBlock.fusable(block):
            model.blocks[i] = FusedBlock(block)
    return model


def unfuse_blocks(model: nn.Module) -> nn.Module:
    """Undo fuse_blocks (in place): every decode step runs op by op again. For measuring and testing."""
    for i, block in enumerate(model.blocks):
        if isinstance(block, FusedBlock):
            model.blocks[i] = block.block
    return model


__all__ = ["FusedBlock", "fuse_blocks", "unfuse_blocks"]
