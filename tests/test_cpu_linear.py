"""PackedLinear and the C decode kernels (decode_bf16.c on AVX512-BF16, decode_avx2.c on AVX2 + FMA): each
kernel this machine runs against the exact product, and the AVX2 path taken in-process (PALMCHAT_MAX_CPU_ISA=avx2)
through whole decode steps and generations."""

import pytest
import torch
import torch.nn.functional as F

from palmchat.inference.engine import Engine, SamplingParams
from palmchat.inference.fused_block import FusedBlock, unfuse_blocks
from palmchat.inference.kv_cache import KVCache
from palmchat.kernels import cpu_linear
from palmchat.kernels.cpu_linear import (
    MAX_AVX2_ROWS,
    MAX_KERNEL_ROWS,
    Int4Linear,
    Int8Linear,
    PackedLinear,
    can_pack,
    linear_bf16,
    linear_q4,
    linear_q8,
    onednn_only,
)
from palmchat.model.config import preset
from palmchat.model.transformer import Transformer
from palmchat.utils import cpu

pytestmark = pytest.mark.kernels
needs_kernel = pytest.mark.skipif(cpu_linear.bf16_kernel() is None, reason="needs a decode kernel (decode_bf16.c or "
                                  "decode_avx2.c, built by setup.py) that this CPU runs")
# every decode kernel, each run where it was built and the CPU (under PALMCHAT_MAX_CPU_ISA) runs it
LEVELS = [pytest.param(level, marks=pytest.mark.skipif(
    cpu_linear.decode_kernel(level) is None,
    reason=f"needs {cpu_linear.KERNEL_NAMES[level]}, built by setup.py, and a CPU that runs it"))
    for level in cpu_linear.DECODE_KERNELS]


def assert_bf16_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
    """y is x @ w.T (+ b) rounded once to bf16: within half a bf16 step (at most 2^-8 relative) of the exact
    result, plus room for fp32 accumulation order."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    slack = 2**-8 * exact.abs() + 1e-5 * F.linear(x.double().abs(), w.double().abs())
    assert ((y.double() - exact).abs() <= slack).all(), (y.double() - exact).abs().max()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("rows", range(1, MAX_KERNEL_ROWS + 1))
@pytest.mark.parametrize("out_features, in_features",  # K below, at and past the 16/32-element steps, odd K and N
                         [(1, 32), (7, 16), (33, 100), (300, 64), (96, 512), (5, 31), (64, 4), (19, 47), (3, 80)])
def test_linear_bf16_equals_the_exact_product_rounded_to_bf16(level, rows, out_features, in_features):
    x = torch.randn(rows, in_features).bfloat16()
    w = torch.randn(out_features, in_features).bfloat16()
    y = linear_bf16(x, w, level=level)
    assert y.shape == (rows, out_features) and y.dtype == torch.bfloat16
    assert_bf16_close(y, x, w)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("rows", [1, 2, MAX_KERNEL_ROWS])
@pytest.mark.parametrize("in_features", [96, 37])
def test_a_bias_joins_the_sum_before_its_one_rounding(level, rows, in_features):
    """Qwen2's q/k/v biases: each C kernel and PackedLinear's other path round x @ w.T + b once."""
    x, w = torch.randn(rows, in_features).bfloat16(), torch.randn(70, in_features).bfloat16()
    b = (50 * torch.randn(70)).bfloat16()
    assert_bf16_close(linear_bf16(x, w, b, level=level), x, w, b)
    with pytest.raises(ValueError, match="bias"):
        linear_bf16(x, w, b.float(), level=level)
    if level == cpu_linear.decode_kernel_level():  # PackedLinear takes the process's kernel, and oneDNN or fp32
        packed = PackedLinear(w, b)
        assert_bf16_close(packed(x), x, w, b)
        many = torch.randn(3 * MAX_KERNEL_ROWS, in_features).bfloat16()
        assert_bf16_close(packed(many), many, w, b)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("rows", [1, 2, 3, MAX_KERNEL_ROWS, MAX_AVX2_ROWS])
@pytest.mark.parametrize("out_features, in_features", [(1, 32), (33, 100), (300, 64), (96, 896), (5, 31), (19, 7)])
def test_linear_q8_equals_the_exact_scaled_product_rounded_to_bf16(level, rows, out_features, in_features):
    """int8 weights with a scale per row: each row's exact sum of int8 x bf16 products, times its scale, rounded
    once to bf16; a bias added after that rounding and rounded again (Int8Linear's PyTorch path)."""
    if rows > MAX_KERNEL_ROWS and level != "avx2":
        pytest.skip("only decode_avx2.c takes more than MAX_KERNEL_ROWS rows")
    layer = Int8Linear(torch.randn(out_features, in_features).bfloat16(), (10 * torch.randn(out_features)).bfloat16())
    x = torch.randn(rows, in_features).bfloat16()
    y = linear_q8(x, layer.qweight, layer.scale, level=level)
    assert y.shape == (rows, out_features) and y.dtype == torch.bfloat16
    assert_bf16_close(y, x, layer.qweight.double() * layer.scale.double()[:, None])
    with_bias = linear_q8(x, layer.qweight, layer.scale, layer.bias, level=level)
    assert_bf16_close(with_bias, y, torch.eye(out_features, dtype=torch.bfloat16), layer.bias)
    with pytest.raises(ValueError, match="int8 weight"):
        linear_q8(x, layer.qweight.float(), layer.scale, level=level)
    if level == cpu_linear.decode_kernel_level():  # Int8Linear takes the process's kernel for a few rows
        assert torch.equal(layer(x[:MAX_KERNEL_ROWS]), linear_q8(x[:MAX_KERNEL_ROWS], layer.qweight, layer.scale,
                                                                 layer.bias))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("rows", [1, 2, 3, MAX_KERNEL_ROWS, MAX_AVX2_ROWS])
@pytest.mark.parametrize("out_features, in_features", [(1, 32), (33, 96), (300, 64), (96, 896), (5, 160)])
def test_linear_q4_equals_the_exact_blockwise_product_rounded_to_bf16(level, rows, out_features, in_features):
    """4-bit weights with a scale per block of 32 (odd and even numbers of blocks): each row's exact sum of the
    dequantized weights times x, rounded once to bf16; a bias added after that rounding and rounded again."""
    if rows > MAX_KERNEL_ROWS and level != "avx2":
        pytest.skip("only decode_avx2.c takes more than MAX_KERNEL_ROWS rows")
    w = torch.randn(out_features, in_features)
    w[0, :32] = 0  # an all-zero block: scale 0
    layer = Int4Linear(w.bfloat16(), (10 * torch.randn(out_features)).bfloat16())
    x = torch.randn(rows, in_features).bfloat16()
    y = linear_q4(x, layer.qweight, layer.scale, level=level)
    assert y.shape == (rows, out_features) and y.dtype == torch.bfloat16
    assert_bf16_close(y, x, layer.dequantized())
    with_bias = linear_q4(x, layer.qweight, layer.scale, layer.bias, level=level)
    assert_bf16_close(with_bias, y, torch.eye(out_features, dtype=torch.bfloat16), layer.bias)
    with pytest.raises(ValueError, match="fp16 scales"):
        linear_q4(x, layer.qweight, layer.scale.bfloat16(), level=level)
    if level == cpu_linear.decode_kernel_level():  # Int4Linear takes the process's kernel for a few rows
        assert torch.equal(layer(x[:MAX_KERNEL_ROWS]), linear_q4(x[:MAX_KERNEL_ROWS], layer.qweight, layer.scale,
                                                                 layer.bias))


@pytest.mark.parametrize("level", LEVELS)
def test_linear_bf16_uses_every_thread_and_keeps_batch_dims(level):
    torch.set_num_threads(2)
    try:
        x, w = torch.randn(2, 2, 256).bfloat16(), torch.randn(1031, 256).bfloat16()  # rows split unevenly
        y = linear_bf16(x, w, level=level)
        assert y.shape == (2, 2, 1031)
        assert_bf16_close(y.view(4, -1), x.view(4, -1), w)
    finally:
        torch.set_num_threads(1)


@needs_kernel
def test_linear_bf16_refuses_what_it_cannot_compute():
    for level in cpu_linear.DECODE_KERNELS:
        if cpu_linear.decode_kernel(level) is not None:
            most = MAX_AVX2_ROWS if level == "avx2" else MAX_KERNEL_ROWS
            with pytest.raises(ValueError, match=f"takes 1..{most} rows"):
                linear_bf16(torch.randn(most + 1, 32).bfloat16(), torch.randn(8, 32).bfloat16(), level=level)
    with pytest.raises(ValueError, match="float32"):
        linear_bf16(torch.randn(1, 32).bfloat16(), torch.randn(8, 32))
    with pytest.raises(ValueError, match="no decode kernel for CPU level 'neon'"):
        linear_bf16(torch.randn(1, 32).bfloat16(), torch.randn(8, 32).bfloat16(), level="neon")


@pytest.mark.parametrize("rows", [5, 8, 13, 30, MAX_AVX2_ROWS])
@pytest.mark.parametrize("out_features, in_features", [(33, 100), (300, 64), (19, 47)])
def test_the_avx2_gemv_takes_a_batch_of_rows(rows, out_features, in_features):
    """Below AVX-512 there is no oneDNN bf16 to hand a batch of decode steps to: decode_avx2.c takes up to
    MAX_AVX2_ROWS rows, in groups of 4 over each few rows of W, the last group short."""
    if cpu_linear.decode_kernel("avx2") is None:
        pytest.skip("needs decode_avx2.c (built by setup.py) and a CPU with AVX2 and FMA")
    x, w = torch.randn(rows, in_features).bfloat16(), torch.randn(out_features, in_features).bfloat16()
    b = torch.randn(out_features).bfloat16()
    assert_bf16_close(linear_bf16(x, w, b, level="avx2"), x, w, b)


def test_the_kernels_of_both_levels_agree():
    """decode_avx2.c and decode_bf16.c both sum fp32 products of the same bf16 values, rounded once: they differ
    only where the order of fp32 additions moves a rounding (here: nowhere, or nearly)."""
    if any(cpu_linear.decode_kernel(level) is None for level in cpu_linear.DECODE_KERNELS):
        pytest.skip("needs both decode kernels (a CPU with AVX512-BF16)")
    x, w, b = torch.randn(3, 999).bfloat16(), torch.randn(517, 999).bfloat16(), torch.randn(517).bfloat16()
    a, z = linear_bf16(x, w, b, level="avx2"), linear_bf16(x, w, b, level="avx512_bf16")
    assert (a == z).float().mean() >= 0.99
    torch.testing.assert_close(a.float(), z.float(), atol=0, rtol=2**-7)


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


# ---------------------------------------------------------------------------------------------
# The AVX2 path in this process: what an AVX2-only CPU runs, on any CPU with AVX2
# ---------------------------------------------------------------------------------------------


def forget_the_cpu():
    cpu.cpu_isa.cache_clear()
    cpu_linear.decode_kernel.cache_clear()
    cpu_linear.decode_kernel_level.cache_clear()


@pytest.fixture
def avx2_only(monkeypatch):
    """This process as on an AVX2-only CPU (PALMCHAT_MAX_CPU_ISA=avx2): decode_avx2.c is the decode kernel, and
    oneDNN packs no bf16 weight. The cached choices are forgotten before and after."""
    if cpu_linear.decode_kernel("avx2") is None:
        pytest.skip("needs decode_avx2.c (built by setup.py) and a CPU with AVX2 and FMA")
    monkeypatch.setenv(cpu.MAX_ISA_VARIABLE, "avx2")
    forget_the_cpu()
    yield
    forget_the_cpu()


def test_under_the_avx2_cap_the_avx2_kernel_is_chosen_and_said_once(avx2_only, capfd):
    assert cpu_linear.decode_kernel_level() == "avx2" and cpu_linear.bf16_kernel() is cpu_linear.decode_kernel("avx2")
    assert cpu_linear.decode_kernel("avx512_bf16") is None  # the cap holds for every level above it
    cpu_linear.bf16_kernel()
    said = [line for line in capfd.readouterr().err.splitlines() if "decode kernel" in line]
    assert said == ["palmchat: bf16 decode kernel: decode_avx2.c (AVX2 + FMA) on a CPU of level avx2"]


@pytest.mark.parametrize("rows", [1, MAX_KERNEL_ROWS, MAX_KERNEL_ROWS + 1, MAX_AVX2_ROWS, MAX_AVX2_ROWS + 1, 40])
@pytest.mark.parametrize("bands", ["one", "of 16 rows"])
def test_below_avx512_a_bf16_packed_linear_runs_the_kernel_or_fp32_products(avx2_only, rows, bands, monkeypatch):
    """oneDNN cannot pack bf16 there: up to MAX_AVX2_ROWS rows (decode steps) go to decode_avx2.c, more (prefill)
    to fp32 products of the bf16 values, rounded once, with the bias. Not PyTorch's bf16 matmul, which such a CPU
    emulates. The weight is widened in bands of its rows (here one, or six with the last one short)."""
    if bands != "one":
        monkeypatch.setattr(cpu_linear, "BAND_BYTES", 1)  # the smallest band: 16 rows
    assert can_pack(torch.bfloat16)
    w, b = torch.randn(90, 45).bfloat16(), (10 * torch.randn(90)).bfloat16()
    packed = PackedLinear(w, b)
    assert packed.packed is None and packed.plain is not None
    x = torch.randn(1, rows, 45).bfloat16()
    assert_bf16_close(packed(x)[0], x[0], w, b)
    onednn_only(packed)  # the kernel off: fp32 products for every call
    assert_bf16_close(packed(x)[0], x[0], w, b)
    int8 = Int8Linear(w)  # likewise with int8 weights (a dequantized copy for the fp32 products)
    exact = F.linear(x[0].double(), int8.dequantized().double())
    torch.testing.assert_close(int8(x)[0].double(), exact, atol=0.01 * float(exact.abs().max()), rtol=0.01)


TINY_SHAPES = {
    "parallel, multi-query": dict(),
    "sequential, grouped-query, q/k/v biases (Qwen2)": dict(block="sequential", norm="rmsnorm", n_kv_heads=2,
                                                             qkv_bias=True),
    "odd widths, head dim 12": dict(dim=72, n_heads=6, n_kv_heads=3, head_dim=12, ffn_hidden=100),
}


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=97, max_seq_len=96, **overrides)).eval()
    with torch.no_grad():
        model.embed.weight.mul_(8.0)  # peaked distributions: greedy choices are not decided by rounding
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # initialised at zero: make them count
                p.normal_()
    return model


@pytest.mark.parametrize("shape", TINY_SHAPES)
@pytest.mark.parametrize("lengths", [[0], [37], [40, 3, 0, 21][:MAX_KERNEL_ROWS]])
def test_an_avx2_decode_step_equals_the_block_op_by_op(avx2_only, shape, lengths):
    """decode_avx2.c's whole block (norm, projections, rotary, cache write, attention over the bf16 cache, SwiGLU)
    against PyTorch's bf16 ops: rows at different positions, the first token of an empty row included."""
    model = tiny_model(**TINY_SHAPES[shape])
    runner = Engine(model, dtype=torch.bfloat16).sync()
    block = runner.blocks[1]
    assert isinstance(block, FusedBlock)
    config = model.config
    fused, ops = (KVCache(config, len(lengths), max_len=64, dtype=torch.bfloat16) for _ in range(2))
    fused.k.normal_(), fused.v.normal_()
    ops.k.copy_(fused.k), ops.v.copy_(fused.v)
    fused.lengths.copy_(torch.tensor(lengths)), ops.lengths.copy_(fused.lengths)
    positions = fused.lengths[:, None]
    rope = runner.rope_cos[positions][:, None], runner.rope_sin[positions][:, None]
    x = (3 * torch.randn(len(lengths), 1, config.dim)).bfloat16()
    with torch.inference_mode():
        y_fused, y_ops = block(x, rope, positions, fused, 1, None), block.block(x, rope, positions, ops, 1, None)
    assert (y_fused == y_ops).float().mean() >= 0.97  # fp32 sums in another order: a few elements a step apart
    torch.testing.assert_close(y_fused.float(), y_ops.float(), atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(fused.k.float(), ops.k.float(), atol=1e-2, rtol=2**-7)
    assert torch.equal(fused.v, ops.v)


@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_greedy_generation_with_the_avx2_kernel_equals_generation_without_it(avx2_only, shape):
    """The engine's bf16 copy on an AVX2 CPU (decode_avx2.c for decode steps, fp32 products for prefill) against
    the same copy with the kernel off (blocks op by op in PyTorch): the same tokens, log-probs to bf16 precision;
    batch 1 and two rows of different lengths."""
    model = tiny_model(**TINY_SHAPES[shape])
    kernel, plain = Engine(model, dtype=torch.bfloat16), Engine(model, dtype=torch.bfloat16)
    assert all(isinstance(b, FusedBlock) for b in kernel.sync().blocks)
    runner = plain.sync()
    onednn_only(runner, plain.packed_head)
    unfuse_blocks(runner)
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    for prompts in ([[5, 17, 42, 8, 2, 3]], [[5, 17, 42, 8, 2, 3], [9, 1]]):
        for a, b in zip(kernel.generate(prompts, params), plain.generate(prompts, params)):
            assert a.tokens == b.tokens
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=0.05, rtol=0)


@pytest.fixture(params=["native", "avx2"])
def each_kernel(request, monkeypatch):
    """This process's own decode kernel, then decode_avx2.c as on an AVX2-only CPU (PALMCHAT_MAX_CPU_ISA=avx2)."""
    if request.param == "avx2":
        request.getfixturevalue("avx2_only")
    elif cpu_linear.bf16_kernel() is None:
        pytest.skip("needs a decode kernel (decode_bf16.c or decode_avx2.c, built by setup.py) that this CPU runs")
    return request.param


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_quantized_greedy_generation_through_the_kernel_equals_the_pytorch_path(each_kernel, shape, quantize):
    """quantize="int8" or "int4" on a bf16 copy: decode steps through the fused blocks and the quantized gemv (the
    head too) against the same weights with the kernels off (PyTorch's int8 kernel or the dequantized weight,
    blocks op by op): the same tokens, log-probs to bf16 precision; batch 1 and two rows of different lengths. The
    odd widths keep int8 under "int4" (no multiple of 32 in)."""
    model = tiny_model(**TINY_SHAPES[shape])
    kernel, plain = (Engine(model, dtype=torch.bfloat16, quantize=quantize) for _ in range(2))
    blocks = kernel.sync().blocks
    assert all(isinstance(b, FusedBlock) and b.call.s_attn_out for b in blocks)  # quantized weights in the kernel
    four_bit = quantize == "int4" and model.config.dim % 32 == 0
    assert all(b.call.q4 == (0b1111 if four_bit else 0) for b in blocks)
    assert isinstance(kernel.packed_head, Int4Linear if four_bit else Int8Linear)
    assert kernel.packed_head.kernel_rows > 0
    runner = plain.sync()
    onednn_only(runner, plain.packed_head)
    unfuse_blocks(runner)
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    for prompts in ([[5, 17, 42, 8, 2, 3]], [[5, 17, 42, 8, 2, 3], [9, 1]]):
        for a, b in zip(kernel.generate(prompts, params), plain.generate(prompts, params)):
            assert a.tokens == b.tokens
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=0.05, rtol=0)
