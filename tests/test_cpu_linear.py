import pytest
import torch
import torch.nn.functional as F

from palmchat.inference.engine import Engine, SamplingParams
from palmchat.kernels.cpu_linear import MAX_KERNEL_ROWS, PackedLinear, bf16_kernel, can_pack, linear_bf16, onednn_only
from palmchat.model.config import preset
from palmchat.model.transformer import Transformer

pytestmark = pytest.mark.kernels
needs_kernel = pytest.mark.skipif(bf16_kernel() is None, reason="needs AVX512-BF16 (decode_bf16.c, built by setup.py)")


def assert_bf16_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
    """y is x @ w.T (+ b) rounded once to bf16: within half a bf16 step (at most 2^-8 relative) of the exact
    result, plus room for fp32 accumulation order."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    slack = 2**-8 * exact.abs() + 1e-5 * F.linear(x.double().abs(), w.double().abs())
    assert ((y.double() - exact).abs() <= slack).all(), (y.double() - exact).abs().max()


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
@pytest.mark.parametrize("rows", [1, MAX_KERNEL_ROWS])
def test_a_bias_joins_the_sum_before_its_one_rounding(rows):
    """Qwen2's q/k/v biases: the C kernel and oneDNN (PackedLinear's two paths) both round x @ w.T + b once."""
    x, w, b = torch.randn(rows, 96).bfloat16(), torch.randn(70, 96).bfloat16(), (50 * torch.randn(70)).bfloat16()
    assert_bf16_close(linear_bf16(x, w, b), x, w, b)
    packed = PackedLinear(w, b)
    assert_bf16_close(packed(x), x, w, b)
    many = torch.randn(3 * MAX_KERNEL_ROWS, 96).bfloat16()
    assert_bf16_close(packed(many), many, w, b)
    with pytest.raises(ValueError, match="bias"):
        linear_bf16(x, w, b.float())


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, MAX_KERNEL_ROWS + 1, 64])
def test_packed_linear_equals_f_linear_for_few_rows_and_many(rows, dtype):
    """fp32 packs on every CPU; bf16 where can_pack says so (palmchat packs bf16 from the avx512 level up)."""
    if dtype == torch.bfloat16 and not can_pack(torch.bfloat16):
        pytest.skip("oneDNN bf16 linears need AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT")
    w = torch.randn(200, 96).to(dtype)
    x = torch.randn(1, rows, 96).to(dtype)
    y = PackedLinear(w)(x)
    assert y.shape == (1, rows, 200) and y.dtype == dtype
    if dtype == torch.bfloat16:
        assert_bf16_close(y[0], x[0], w)
    else:
        torch.testing.assert_close(y[0].double(), F.linear(x[0].double(), w.double()), atol=1e-4, rtol=1e-5)


@needs_kernel
def test_batch_one_decode_through_the_kernel_equals_onednn():
    """The engine's bf16 copy decodes one row through decode_bf16.c; with the kernel switched off (every linear on
    oneDNN) the greedy tokens are the same and the log-probs agree to bf16 precision."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=97, dim=128, max_seq_len=96)).eval()
    with torch.no_grad():
        model.embed.weight.mul_(8.0)  # peaked distributions: greedy choices are not decided by rounding
    prompt, params = [[5, 17, 42, 8, 2, 3]], SamplingParams(max_new_tokens=40, temperature=0.0)
    kernel = Engine(model, dtype=torch.bfloat16)
    onednn = Engine(model, dtype=torch.bfloat16)
    runner = onednn.sync()
    assert any(m.plain is not None for m in runner.modules() if isinstance(m, PackedLinear))
    onednn_only(runner, onednn.packed_head)
    a, b = kernel.generate(prompt, params)[0], onednn.generate(prompt, params)[0]
    assert a.tokens == b.tokens
    torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=0.05, rtol=0)
