"""The fused decode block (palmchat/inference/fused_block.py, decode_bf16.c) against the PyTorch block it wraps."""

import pytest
import torch

from palmchat.inference.engine import Engine, SamplingParams
from palmchat.inference.fused_block import FusedBlock, unfuse_blocks
from palmchat.inference.kv_cache import KVCache
from palmchat.kernels.cpu_linear import MAX_KERNEL_ROWS, bf16_kernel, onednn_only
from palmchat.model.config import preset
from palmchat.model.transformer import Transformer

pytestmark = [pytest.mark.kernels,
              pytest.mark.skipif(bf16_kernel() is None, reason="needs AVX512-BF16 (decode_bf16.c, built by setup.py)")]

SHAPES = {
    "parallel, multi-query": dict(),
    "sequential, rmsnorm, grouped-query": dict(block="sequential", norm="rmsnorm", n_kv_heads=2),
    "multi-head, head dim 40": dict(n_heads=4, n_kv_heads=4, head_dim=40),  # D not a multiple of 32: masked tails
    "parallel, grouped-query, odd widths": dict(dim=72, n_heads=6, n_kv_heads=3, head_dim=12, ffn_hidden=100),
    "sequential, q/k/v biases (Qwen2)": dict(block="sequential", norm="rmsnorm", n_kv_heads=2, qkv_bias=True),
}


def bf16_copy(**overrides):
    torch.manual_seed(0)
    config = preset("tiny", **overrides)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # initialised at zero: make them count
                p.normal_()
    engine = Engine(model, dtype=torch.bfloat16)
    return config, engine.sync()


def random_caches(config, lengths):
    a = KVCache(config, len(lengths), max_len=64, dtype=torch.bfloat16)
    a.k.normal_(), a.v.normal_()
    a.lengths.copy_(torch.tensor(lengths))
    b = KVCache(config, len(lengths), max_len=64, dtype=torch.bfloat16)
    b.k.copy_(a.k), b.v.copy_(a.v), b.lengths.copy_(a.lengths)
    return a, b


def agree(a: torch.Tensor, b: torch.Tensor, identical: float = 0.97):
    """The PyTorch bf16 path and the C one round at the same places and differ only in the order of fp32 sums
    (and the last bits of exp): nearly every element is bit-identical and the rest are a bf16 step apart.
    (Rounding the rotary products once instead of each one leaves ~80% of new keys identical.)"""
    a, b = a.float(), b.float()
    assert (a == b).float().mean() >= identical, f"only {(a == b).float().mean():.1%} of elements are identical"
    torch.testing.assert_close(a, b, atol=1e-2, rtol=2**-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lengths", [[0], [9], [40, 3], [13, 0, 27, 5][:MAX_KERNEL_ROWS]])
def test_a_fused_decode_step_equals_the_block_op_by_op(shape, lengths):
    """Output and KV cache, rows at different positions (the first token of an empty row included)."""
    config, runner = bf16_copy(**SHAPES[shape])
    assert all(isinstance(b, FusedBlock) for b in runner.blocks)
    fused = runner.blocks[1]
    cache_fused, cache_ops = random_caches(config, lengths)
    positions = cache_fused.lengths[:, None]  # (B, 1)
    rope = runner.rope_cos[positions][:, None], runner.rope_sin[positions][:, None]
    x = (3 * torch.randn(len(lengths), 1, config.dim)).bfloat16()
    with torch.inference_mode():
        y_fused = fused(x, rope, positions, cache_fused, 1, None)
        y_ops = fused.block(x, rope, positions, cache_ops, 1, None)
    agree(y_fused, y_ops)
    new = torch.zeros_like(cache_fused.k, dtype=torch.bool)  # the slots this step writes: layer 1, each row's length
    for row, length in enumerate(lengths):
        new[1, row, :, length] = True
    agree(cache_fused.k[new], cache_ops.k[new], identical=0.95)
    assert torch.equal(cache_fused.v, cache_ops.v)  # values are copied as they are
    assert torch.equal(cache_fused.k[~new], cache_ops.k[~new])  # and nothing else is written


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_greedy_decoding_equals_op_by_op(shape):
    """Whole generations: the fused engine against the same copy unfused, two prompts of different lengths."""
    config, _ = bf16_copy(**SHAPES[shape])
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.embed.weight.mul_(8.0)  # peaked distributions: greedy choices are not decided by a rounding
    prompts, params = [[5, 17, 42, 8, 2, 3], [9, 1]], SamplingParams(max_new_tokens=40, temperature=0.0)
    fused, ops = Engine(model, dtype=torch.bfloat16), Engine(model, dtype=torch.bfloat16)
    unfuse_blocks(ops.sync())
    for prompt in [prompts[:1], prompts]:  # batch 1, and 2 rows in one batch
        for a, b in zip(fused.generate(prompt, params), ops.generate(prompt, params)):
            assert a.tokens == b.tokens
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=0.05, rtol=0)


def test_what_the_kernel_does_not_take_runs_op_by_op():
    """Prefill (T > 1), more rows than the kernel takes, and a copy whose kernels were switched off go through
    the wrapped block itself: bit-identical to it."""
    config, runner = bf16_copy()
    fused = runner.blocks[0]
    with torch.inference_mode():
        for batch, tokens in [(1, 5), (MAX_KERNEL_ROWS + 1, 1)]:
            a, b = random_caches(config, [3] * batch)
            positions = a.lengths[:, None] + torch.arange(tokens)
            rope = runner.rope_cos[positions][:, None], runner.rope_sin[positions][:, None]
            x = torch.randn(batch, tokens, config.dim).bfloat16()
            assert torch.equal(fused(x, rope, positions, a, 0, None), fused.block(x, rope, positions, b, 0, None))
            assert torch.equal(a.k, b.k)
    onednn_only(runner)
    a, b = random_caches(config, [3])
    positions = a.lengths[:, None]
    rope = runner.rope_cos[positions][:, None], runner.rope_sin[positions][:, None]
    x = torch.randn(1, 1, config.dim).bfloat16()
    with torch.inference_mode():
        assert torch.equal(fused(x, rope, positions, a, 0, None), fused.block(x, rope, positions, b, 0, None))


def test_a_full_cache_is_a_clear_error():
    config, runner = bf16_copy()
    cache = KVCache(config, 1, max_len=4, dtype=torch.bfloat16)
    cache.lengths.fill_(4)
    with pytest.raises(ValueError, match="KV cache full: position 4 is past its 4 slots"), torch.inference_mode():
        runner.hidden_states(torch.tensor([[1]]), cache=cache)


def test_fp32_copies_are_not_fused_and_lora_steps_run_op_by_op():
    from palmchat.model.lora import add_lora, lora_layers, set_adapter

    config = preset("tiny")
    model = Transformer(config).eval()
    assert not any(isinstance(b, FusedBlock) for b in Engine(model, dtype=torch.float32).sync().blocks)
    add_lora(model, "a", rank=2, targets=("attn_out",))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["a"].normal_(std=0.5)
    engine = Engine(model, dtype=torch.bfloat16)
    assert all(isinstance(b, FusedBlock) for b in engine.sync().blocks)  # base-only steps still run in C
    prompts, params = [[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=6, temperature=0.0)
    outs = {}
    for name in ("a", None):
        set_adapter(model, name)
        outs[name] = [c.tokens for c in engine.generate(prompts, params)]
        unfused = Engine(model, dtype=torch.bfloat16)
        unfuse_blocks(unfused.sync())
        assert [c.tokens for c in unfused.generate(prompts, params)] == outs[name]
    assert outs["a"] != outs[None]  # the adapter was applied, not skipped by the kernel
