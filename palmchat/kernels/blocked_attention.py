"""Causal attention for CPU training, computed one block of queries at a time.

FlashAttention-2, Dao 2023, https://arxiv.org/abs/2307.08691 (§3.1: the forward keeps only each row's
log-sum-exp; the backward recomputes the scores block by block).

Why not F.scaled_dot_product_attention here: on a CPU without AMX its flash kernel runs multi-query attention
(8 query heads on one K/V head) far below the bf16 matmul rate, and this file is faster, eager or under
torch.compile (docs/decisions.md). Two things make it faster: the G query heads that share one K/V head are
folded into the rows of one matmul (K and V are never repeated), and the block of scores is small enough to stay
in cache. Memory is O(T x block), never (T, T).
GPUs keep the fused SDPA kernels (palm.attention), and so do CPUs with AMX: there PyTorch's flash kernel runs
its block matmuls on AMX tiles (oneDNN brgemm) and is faster than this file at every shape measured
(`SDPA_IS_FASTER_ON_THIS_CPU`; docs/decisions.md), and in bf16 palmchat's C kernel on AMX tiles
(cpu_attention.py) is faster still.

Shapes: B batch, H query heads, Hkv K/V heads, G = H // Hkv, T tokens, D head dim, R query rows per block.
"""

from __future__ import annotations

import torch

from palmchat.utils import cpu


def _sdpa_is_faster_on_this_cpu() -> bool:
    """AMX tiles (as palmchat sees the CPU, under PALMCHAT_MAX_CPU_ISA, and as PyTorch can use them), and SDPA's
    enable_gqa (torch >= 2.5) so that K/V are not repeated per query head."""
    pytorch_has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    new_enough = torch.__version__ >= (2, 5)  # a TorchVersion: compares with tuples
    return cpu.cpu_supports("amx") and pytorch_has_amx() and new_enough


SDPA_IS_FASTER_ON_THIS_CPU = _sdpa_is_faster_on_this_cpu()
ROWS_PER_BLOCK = 256  # G x query positions per block; fastest measured for G = 8 at T = 512 (eager and compiled)


def _wide(x: torch.Tensor) -> torch.dtype:
    """Softmax and gradient sums run in float32 (float64 stays float64) whatever the matmul dtype."""
    return torch.promote_types(x.dtype, torch.float32)


def _block_scores(q_rows, k, start, end, scale):
    """q_rows: (B, Hkv, G * (end - start), D) queries at positions start..end-1; k: (B, Hkv, >= end, D)
    -> (B, Hkv, G, end - start, end) scaled scores in float32 or wider, -inf where a key comes after its query."""
    B, Hkv, _, _ = q_rows.shape
    scores = torch.matmul(q_rows, k[:, :, :end].transpose(-1, -2)).to(_wide(q_rows)).mul_(scale)
    scores = scores.view(B, Hkv, -1, end - start, end)
    future = torch.arange(end, device=k.device)[None, :] > torch.arange(start, end, device=k.device)[:, None]
    return scores.masked_fill_(future, float("-inf"))


class BlockedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        block = max(1, ROWS_PER_BLOCK // G)
        scale = D**-0.5
        q_heads = q.view(B, Hkv, G, T, D)
        out = torch.empty_like(q).view(B, Hkv, G, T, D)
        lse = torch.empty(B, Hkv, G, T, dtype=_wide(q), device=q.device)
        for start in range(0, T, block):
            end = min(start + block, T)
            rows = q_heads[:, :, :, start:end].reshape(B, Hkv, G * (end - start), D)
            scores = _block_scores(rows, k, start, end, scale)  # (B, Hkv, G, R/G, end)
            row_lse = scores.logsumexp(-1, keepdim=True)
            probs = (scores - row_lse).exp_().to(v.dtype).view(B, Hkv, -1, end)
            out[:, :, :, start:end] = torch.matmul(probs, v[:, :, :end]).view(B, Hkv, G, end - start, D)
            lse[:, :, :, start:end] = row_lse.squeeze(-1)
        out = out.view(B, H, T, D)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        block = max(1, ROWS_PER_BLOCK // G)
        scale = D**-0.5
        grad_out = grad_out.contiguous()
        # dS = P * (dP - rowsum(dO * O)): the row term computed once for all blocks (FlashAttention-2 eq. 4)
        delta = (grad_out.to(_wide(q)) * out.to(_wide(q))).sum(-1).view(B, Hkv, G, T, 1)
        q_heads, grad_out_heads = q.view(B, Hkv, G, T, D), grad_out.view(B, Hkv, G, T, D)
        grad_q = torch.empty_like(q).view(B, Hkv, G, T, D)
        grad_k = torch.zeros(k.shape, dtype=_wide(k), device=k.device)
        grad_v = torch.zeros(v.shape, dtype=_wide(v), device=v.device)
        for start in range(0, T, block):
            end = min(start + block, T)
            rows = q_heads[:, :, :, start:end].reshape(B, Hkv, G * (end - start), D)
            grad_rows = grad_out_heads[:, :, :, start:end].reshape(B, Hkv, G * (end - start), D)
            probs = (_block_scores(rows, k, start, end, scale) - lse[:, :, :, start:end, None]).exp_()
            grad_probs = torch.matmul(grad_rows, v[:, :, :end].transpose(-1, -2)).to(probs.dtype).view(probs.shape)
            grad_scores = (probs * (grad_probs - delta[:, :, :, start:end])).mul_(scale)
            grad_scores = grad_scores.to(q.dtype).view(B, Hkv, -1, end)
            probs = probs.to(q.dtype).view(B, Hkv, -1, end)
            grad_v[:, :, :end] += torch.matmul(probs.transpose(-1, -2), grad_rows).to(grad_v.dtype)
            grad_k[:, :, :end] += torch.matmul(grad_scores.transpose(-1, -2), rows).to(grad_k.dtype)
            grad_q[:, :, :, start:end] = torch.matmul(grad_scores, k[:, :, :end]).view(B, Hkv, G, end - start, D)
        return grad_q.view(B, H, T, D), grad_k.to(k.dtype), grad_v.to(v.dtype)


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: (B, H, T, D); k, v: (B, Hkv, T, D) with Hkv dividing H -> (B, H, T, D), causal softmax attention."""
    with torch.autocast(q.device.type, enabled=False):  # dtypes are chosen explicitly above
        dtype = torch.promote_types(q.dtype, torch.promote_types(k.dtype, v.dtype))
        return BlockedCausalAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype))
