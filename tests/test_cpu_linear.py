import platform

import pytest
import torch
import torch.nn.functional as F

from palmchat.config import preset
from palmchat.inference.cpu_linear import MAX_KERNEL_ROWS, PackedLinear, bf16_kernel, linear_bf16, onednn_only
from palmchat.inference.engine import Engine, SamplingParams
from palmchat.model.palm import PaLM
from palmchat.train.common import cpu_has_bf16

needs_kernel = pytest.mark.skipif(bf16_kernel() is None,
                                  reason="decode_bf16.c is not built or the CPU lacks AVX512-BF16")


def assert_bf16_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """y is x @ w.T rounded once to bf16: within half a bf16 step (at most 2^-8 relative) of the exact product,
    plus room for fp32 accumulation order."""
    exact = F.linear(x.double(), w.double())
    slack = 2**-8 * exact.abs() + 1e-5 * F.linear(x.double().abs(), w.double().abs())
    assert ((y.double() - exact).abs() <= slack).all(), (y.double() - exact).abs().max()


def test_the_kernel_is_built_where_the_cpu_can_run_it():
    if platform.system() != "Linux" or platform.machine() != "x86_64" or not cpu_has_bf16():
        pytest.skip("decode_bf16.c is only built and used on x86-64 Linux with AVX512-BF16")
    assert bf16_kernel() is not None, "decode_bf16.c was not built: run `pip install -e .` with a C compiler"


@needs_kernel
@pytest.mark.parametrize("rows", range(1, MAX_KERNEL_ROWS + 1))
@pytest.mark.parametrize("out_features, in_features",
                         [(1, 32), (7, 16), (33, 100), (300, 64), (96, 512), (5, 31), (64, 4)])
def test_linear_bf16_equals_the_exact_product_rounded_to_bf16(rows, out_features, in_features):
    x = torch.randn(rows, in_features).bfloat16()
    w = torch.randn(out_features, in_features).bfloat16()
    y = linear_bf16(x, w)
    assert y.shape == (rows, out_features) and y.dtype == torch.bfloat16
    assert_bf16_close(y, x, w)


@needs_kernel
def test_linear_bf16_uses_every_thread_and_keeps_batch_dims():
    torch.set_num_threads(2)
    try:
        x, w = torch.randn(2, 2, 256).bfloat16(), torch.randn(1031, 256).bfloat16()  # rows split unevenly
        y = linear_bf16(x, w)
        assert y.shape == (2, 2, 1031)
        assert_bf16_close(y.view(4, -1), x.view(4, -1), w)
    finally:
        torch.set_num_threads(1)


@needs_kernel
def test_linear_bf16_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="rows"):
        linear_bf16(torch.randn(MAX_KERNEL_ROWS + 1, 32).bfloat16(), torch.randn(8, 32).bfloat16())
    with pytest.raises(ValueError, match="float32"):
        linear_bf16(torch.randn(1, 32).bfloat16(), torch.randn(8, 32))


@pytest.mark.parametrize("rows", [1, 3, MAX_KERNEL_ROWS + 1, 64])
def test_packed_linear_equals_f_linear_for_few_rows_and_many(rows):
    w = torch.randn(200, 96).bfloat16()
    x = torch.randn(1, rows, 96).bfloat16()
    y = PackedLinear(w)(x)
    assert y.shape == (1, rows, 200)
    assert_bf16_close(y[0], x[0], w)


@needs_kernel
def test_batch_one_decode_through_the_kernel_equals_onednn():
    """The engine's bf16 copy decodes one row through decode_bf16.c; with the kernel switched off (every linear on
    oneDNN) the greedy tokens are the same and the log-probs agree to bf16 precision."""
    torch.manual_seed(0)
    model = PaLM(preset("tiny", vocab_size=97, dim=128, max_seq_len=96)).eval()
    with torch.no_grad():
        model.embed.weight.mul_(8.0)  # peaked distributions: greedy choices are not decided by rounding
    prompt, params = [[5, 17, 42, 8, 2, 3]], SamplingParams(max_new_tokens=40, temperature=0.0)
    kernel = Engine(model, dtype=torch.bfloat16)
    onednn = Engine(model, dtype=torch.bfloat16)
    onednn.sync()
    assert any(m.plain is not None for m in onednn._copy.modules() if isinstance(m, PackedLinear))
    onednn_only(onednn._copy, onednn._head)
    a, b = kernel.generate(prompt, params)[0], onednn.generate(prompt, params)[0]
    assert a.tokens == b.tokens
    torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=0.05, rtol=0)
