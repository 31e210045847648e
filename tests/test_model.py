import pytest
import torch

from palmchat.inference.kv_cache import KVCache
from palmchat.kernels.blocked_attention import ROWS_PER_BLOCK, blocked_causal_attention
from palmchat.model import attention
from palmchat.model.config import ModelConfig, preset
from palmchat.model.rope import apply_rotary, rotary_tables
from palmchat.model.transformer import Transformer

pytestmark = pytest.mark.kernels  # the CPU training attention: SDPA or the blocked kernel

VARIANTS = [dict(block=b, n_kv_heads=kv, norm=n) for b in ("parallel", "sequential") for kv in (1, 2, 4)
            for n in ("layernorm", "rmsnorm")]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_kv_cache_logits_equal_full_forward(overrides):
    config = preset("tiny", vocab_size=97, **overrides)
    model = Transformer(config).eval()
    x = torch.randint(0, 97, (3, 24))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(config, batch_size=3)
        pieces = [model(x[:, :9], cache=cache)]  # prefill, then one token at a time
        pieces += [model(x[:, t : t + 1], cache=cache) for t in range(9, 24)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.lengths.tolist() == [24, 24, 24]


@pytest.mark.parametrize("heads, kv_heads, length", [(8, 1, ROWS_PER_BLOCK // 8 * 3 + 5), (4, 2, 70), (3, 3, 300)])
def test_blocked_attention_equals_sdpa_values_and_gradients(heads, kv_heads, length):
    """The CPU training kernel against PyTorch's causal SDPA, in float64: outputs and all three gradients,
    with a sequence that is not a whole number of blocks."""
    torch.manual_seed(0)
    q = torch.randn(2, heads, length, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, length, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(2, heads, length, 8, dtype=torch.float64)
    repeat = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), is_causal=True)
    out = blocked_causal_attention(q, k, v)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for got, want in zip(grads, torch.autograd.grad(expected, (q, k, v), grad_out)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_the_two_cpu_training_kernels_give_the_same_loss_and_gradients(monkeypatch, kv_heads):
    """The training path takes SDPA on CPUs with AMX and the blocked kernel elsewhere: whichever this CPU
    takes, the other must agree with it (float64, whole model: loss and every parameter's gradient)."""
    config = preset("tiny", vocab_size=97, n_kv_heads=kv_heads)
    model = Transformer(config).double()
    x = torch.randint(0, 97, (2, 40))
    results = []
    for use_sdpa in (True, False):
        monkeypatch.setattr(attention, "SDPA_IS_FASTER_ON_THIS_CPU", use_sdpa)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (loss_sdpa, grads_sdpa), (loss_blocked, grads_blocked) = results
    torch.testing.assert_close(loss_sdpa, loss_blocked, atol=1e-12, rtol=1e-10)
    for got, want in zip(grads_sdpa, grads_blocked):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_blocked_attention_under_bf16_autocast_and_compile_matches_float32():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 1, 40, 16), torch.randn(2, 1, 40, 16)
    exact = blocked_causal_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = torch.compile(blocked_causal_attention)(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), exact, atol=3e-2, rtol=3e-2)


def test_rows_of_different_lengths_share_one_cache(tiny_config):
    """Right-padded prefill, then each row continues from its own length (what the engine does)."""
    model = Transformer(tiny_config).eval()
    a, b = torch.randint(0, 97, (1, 12)), torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        cache = KVCache(tiny_config, batch_size=2)
        padded = torch.zeros(2, 12, dtype=torch.long)
        padded[0], padded[1, :5] = a[0], b[0]
        model(padded, cache=cache)
        cache.lengths = torch.tensor([12, 5])
        nxt = torch.tensor([[7], [9]])
        step = model(nxt, cache=cache)
        ref_a = model(torch.cat([a, nxt[:1]], 1))[:, -1]
        ref_b = model(torch.cat([b, nxt[1:]], 1))[:, -1]
    torch.testing.assert_close(step[0, -1], ref_a[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step[1, -1], ref_b[0], atol=1e-5, rtol=1e-4)


def test_left_padding_mask_gives_unpadded_logits(tiny_config):
    model = Transformer(tiny_config).eval()
    seq = torch.randint(1, 97, (1, 10))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), seq], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, padding_mask=mask)[:, 4:], model(seq), atol=1e-5, rtol=1e-4)


def test_causality_future_tokens_do_not_change_past_logits(tiny_config):
    model = Transformer(tiny_config).eval()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :10], model(y)[:, :10])


def test_context_overflow_is_a_clear_error(tiny_config):
    model = Transformer(tiny_config)
    with pytest.raises(ValueError, match="longer than the model's context of 128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_untied_embeddings_and_parameter_count():
    for tie in (True, False):
        config = preset("tiny", vocab_size=97, tie_embeddings=tie)
        model = Transformer(config)
        assert model.num_params() == config.num_params()
        assert (model.lm_head is None) == tie


def test_rope_scaling_interpolates_positions():
    base = preset("tiny", vocab_size=97)
    scaled = preset("tiny", vocab_size=97, rope_scaling=2.0)
    m1, m2 = Transformer(base), Transformer(scaled)
    # position 2p under scaling 2 rotates like position p without scaling
    torch.testing.assert_close(m2.rope_cos[20], m1.rope_cos[10])
    assert not torch.allclose(m2.rope_cos[20], m1.rope_cos[20])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_the_rotate_half_formula_bit_for_bit(dtype):
    """apply_rotary's x * [cos, cos] + [x2, x1] * [-sin, sin] is RoFormer's rotation in the rotate-half layout of
    GPT-NeoX / Llama: [x1 cos - x2 sin, x2 cos + x1 sin] for angle position * theta^(-i / (D/2))."""
    config = preset("tiny", vocab_size=97, head_dim=8, rope_theta=100.0)
    cos_table, sin_table = rotary_tables(config, 12)
    x = torch.randn(2, 3, 12, 8, dtype=dtype)  # (B, heads, T, D)
    got = apply_rotary(x, cos_table[None, None], sin_table[None, None])
    inv_freq = 1.0 / 100.0 ** (torch.arange(4, dtype=torch.float64) / 4)
    angle = torch.arange(12, dtype=torch.float64)[:, None] * inv_freq  # (T, D/2)
    cos, sin = angle.cos().float().to(dtype), angle.sin().float().to(dtype)
    x1, x2 = x[..., :4], x[..., 4:]
    expected = torch.cat((x1 * cos + (-x2) * sin, x2 * cos + x1 * sin), dim=-1)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bad,match", [
    (dict(n_heads=4, n_kv_heads=3), "must divide n_heads"),
    (dict(block="weird"), "parallel"),
    (dict(dim=30, n_heads=4), "divisible"),
])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**bad)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"dim": 64, "colour": 3})


def test_training_reduces_loss_on_a_repeated_batch(tiny_config):
    model = Transformer(tiny_config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (4, 33))
    losses = []
    for _ in range(30):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_activation_checkpointing_recomputes_blocks_and_keeps_the_gradients():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=100)).train()
    x = torch.randint(0, 100, (2, 16))
    calls, block_forward = [], model.blocks[0].forward

    def counted(*args, **kwargs):
        calls.append(1)
        return block_forward(*args, **kwargs)

    model.blocks[0].forward = counted

    def grads(flag):
        model.zero_grad()
        model.gradient_checkpointing = flag
        calls.clear()
        model(x).float().logsumexp(-1).sum().backward()
        return [p.grad.clone() for p in model.parameters()], len(calls)

    (plain, plain_calls), (recomputed, recomputed_calls) = grads(False), grads(True)
    assert (plain_calls, recomputed_calls) == (1, 2)  # the block ran again in backward
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed))
    with torch.no_grad():
        calls.clear()
        model(x)
        assert len(calls) == 1  # no recomputation without gradients
