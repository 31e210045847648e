"""The C attention backward for bf16 CPU training (palmchat/kernels/attention_bf16.c via cpu_attention.py)."""

import pytest
import torch
import torch.nn.functional as F

from palmchat.kernels import cpu_attention
from palmchat.model.config import preset
from palmchat.model.transformer import Transformer

pytestmark = [pytest.mark.kernels, pytest.mark.skipif(
    cpu_attention.KERNEL is None, reason="needs AVX512-BF16 (attention_bf16.c, built by setup.py)")]
needs_amx = pytest.mark.skipif(not cpu_attention.ON_THIS_CPU,
                               reason="needs AMX (the training path takes attention_bf16.c on AMX tiles only)")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def bf16_inputs(B, H, Hkv, T, D, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, grad_out = (torch.randn(B, H, T, D, generator=generator).bfloat16() for _ in range(2))
    k, v = (torch.randn(B, Hkv, T, D, generator=generator).bfloat16() for _ in range(2))
    return q, k, v, grad_out


# (B, H, Hkv, T, D): multi-query, grouped and multi-head; T not a multiple of the 32-token tile; D = 16 takes the
# AVX512-BF16 products, D = 32/64/128 the AMX tiles where the CPU has them
SHAPES = [(2, 8, 1, 100, 64), (1, 4, 2, 33, 32), (3, 2, 2, 64, 16), (2, 8, 1, 512, 64), (1, 4, 4, 7, 128)]


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64_attention_as_well_as_pytorchs_kernel(shape):
    q, k, v, _ = bf16_inputs(*shape)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
    out, lse = cpu_attention.causal_attention_forward(q, k, v)
    expected_out, expected_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    error, pytorch_error = relative_error(out, exact), relative_error(expected_out, exact)
    assert error < 4e-3 and error < 1.1 * pytorch_error + 1e-4, f"{error:.2e} vs PyTorch's {pytorch_error:.2e}"
    torch.testing.assert_close(lse, expected_lse, atol=2e-4, rtol=0)  # what the backward recomputes P with


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_float64_attention_at_least_as_well_as_pytorchs_kernel(shape):
    q, k, v, grad_out = bf16_inputs(*shape)
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    F.scaled_dot_product_attention(*exact, is_causal=True, enable_gqa=True).backward(grad_out.double())
    ours = [x.clone().requires_grad_() for x in (q, k, v)]
    out = cpu_attention.causal_attention(*ours)
    out.backward(grad_out)
    pytorch = [x.clone().requires_grad_() for x in (q, k, v)]
    F.scaled_dot_product_attention(*pytorch, is_causal=True, enable_gqa=True).backward(grad_out)
    for name, mine, theirs, want in zip("qkv", ours, pytorch, exact):
        error, pytorch_error = relative_error(mine.grad, want.grad), relative_error(theirs.grad, want.grad)
        # bf16 inputs, P and dS rounded to bf16 for the products: ~2.5e-3 measured, as PyTorch's kernel
        assert error < 5e-3, f"d{name}: relative error {error:.2e}"
        assert error < 1.2 * pytorch_error + 1e-4, f"d{name}: {error:.2e} vs PyTorch's {pytorch_error:.2e}"


def test_strided_inputs_give_the_same_gradients():
    """q as the model makes it, a transposed view of (B, T, H, D); the kernel reads strides instead of copying."""
    q, k, v, grad_out = bf16_inputs(2, 4, 1, 50, 64)
    contiguous = [x.clone().requires_grad_() for x in (q, k, v)]
    cpu_attention.causal_attention(*contiguous).backward(grad_out)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    k_view, v_view = (x.clone().requires_grad_() for x in (k, v))
    assert not q_view.is_contiguous()
    cpu_attention.causal_attention(q_view, k_view, v_view).backward(grad_out)
    for got, want in zip((q_view, k_view, v_view), contiguous):
        torch.testing.assert_close(got.grad, want.grad, atol=0, rtol=0)


def test_the_custom_ops_pass_torch_library_opcheck():
    """Schema, fake tensors (what torch.compile traces with) and the autograd registration."""
    q, k, v, grad_out = bf16_inputs(2, 4, 1, 40, 64)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(cpu_attention.causal_attention_forward, (q, k, v))
    out, lse = cpu_attention.causal_attention_forward(q.detach(), k.detach(), v.detach())
    torch.library.opcheck(cpu_attention.causal_attention_backward,
                          (q.detach(), k.detach(), v.detach(), out, lse, grad_out))


@needs_amx
def test_a_bf16_training_step_takes_the_kernel_and_matches_sdpa(monkeypatch):
    """Whole model under bf16 autocast: the loss and every gradient with the C kernel and with SDPA."""
    config = preset("tiny", vocab_size=97, head_dim=32)
    model = Transformer(config)
    x = torch.randint(0, 97, (2, 70))
    calls = []
    attention = cpu_attention.causal_attention
    monkeypatch.setattr(cpu_attention, "causal_attention", lambda *qkv: calls.append(1) or attention(*qkv))
    results = []
    for use_kernel in (True, False):
        monkeypatch.setattr(cpu_attention, "ON_THIS_CPU", use_kernel)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    assert len(calls) == config.n_layers  # the first pass took the kernel in every layer, the second none
    (loss_kernel, grads_kernel), (loss_sdpa, grads_sdpa) = results
    torch.testing.assert_close(loss_kernel, loss_sdpa, atol=0, rtol=1e-3)
    for got, want in zip(grads_kernel, grads_sdpa):
        assert relative_error(got, want.double()) < 2e-2


@needs_amx
def test_torch_compile_traces_the_kernel_without_a_graph_break():
    """fullgraph=True fails on any graph break (loading the library on first use was one); aot_eager runs the
    traced forward and backward graphs, with the custom ops' fake tensors and autograd formula, without codegen."""
    config = preset("tiny", vocab_size=97, head_dim=32)
    model = Transformer(config)
    x = torch.randint(0, 97, (2, 40))

    def loss_and_grads(forward):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    eager_loss, eager_grads = loss_and_grads(model)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)
