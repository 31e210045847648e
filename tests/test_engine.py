"""Tests for palmchat.inference.engine on tiny random models (each test runs in well under a second)."""

import math

import pytest
import torch
import torch.nn.functional as F

from palmchat.inference.engine import Completion, Engine, SamplingParams, filter_logits
from palmchat.kernels.cpu_linear import PackedLinear
from palmchat.model.config import preset
from palmchat.model.transformer import Transformer

pytestmark = pytest.mark.kernels  # the inference copies: packed linears, C kernels

VOCAB = 97
# prompts of different lengths, one of a single token
PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [int(t) for t in torch.arange(17) * 5 % VOCAB]]


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    # a large init std makes the random model's distributions peaked, so greedy choices are never near-ties
    config = preset("tiny", vocab_size=VOCAB, init_std=0.3, **overrides)
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


@torch.no_grad()
def full_logprobs(model, prompt, tokens, temperature=1.0):
    """log-probabilities of `tokens` after `prompt` from one plain forward pass, as PPO recomputes them."""
    seq = torch.tensor([prompt + tokens])
    logits = model(seq)[0, len(prompt) - 1 : -1] / temperature  # (n, V): position t predicts token t + 1
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


# ---- greedy decoding ------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"block": "sequential", "n_kv_heads": 2}, {"n_kv_heads": 4}])
def test_batched_greedy_equals_each_prompt_alone(overrides):
    engine = Engine(make_model(**overrides))
    batched = engine.generate(PROMPTS, greedy(12))
    for prompt, out in zip(PROMPTS, batched):
        alone = engine.generate([prompt], greedy(12))[0]
        assert out.tokens == alone.tokens
        assert out.finish_reason == "length" and len(out.tokens) == 12
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)


def test_greedy_is_argmax_of_full_forward_at_every_step(model, engine):
    outs = engine.generate(PROMPTS, greedy(10))
    with torch.no_grad():
        for prompt, out in zip(PROMPTS, outs):
            for t in range(len(out.tokens)):
                logits = model(torch.tensor([prompt + out.tokens[:t]]))[0, -1]
                assert int(logits.argmax()) == out.tokens[t]
                assert math.isclose(out.logprobs[t], float(logits.log_softmax(-1)[out.tokens[t]]), abs_tol=1e-5)


def test_top_k_1_equals_greedy(engine):
    ref = engine.generate(PROMPTS, greedy(10))
    got = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.3, top_k=1, seed=3))
    assert [c.tokens for c in got] == [c.tokens for c in ref]


def test_zero_new_tokens(engine):
    assert engine.generate([[1, 2]], greedy(0)) == [Completion([], [], "length")]


# ---- stopping -------------------------------------------------------------------------------


def test_stop_token_ends_one_row_while_another_continues(engine):
    ref = engine.generate(PROMPTS[:2], greedy(16))
    stop = ref[0].tokens[3]
    cut = ref[0].tokens.index(stop) + 1  # the stop token is included
    outs = engine.generate(PROMPTS[:2], [greedy(16, stop_token_ids=(stop,)), greedy(16)])
    assert outs[0].tokens == ref[0].tokens[:cut] and outs[0].finish_reason == "stop"
    assert outs[0].logprobs == pytest.approx(ref[0].logprobs[:cut], abs=1e-5)
    assert outs[1].tokens == ref[1].tokens and outs[1].finish_reason == "length"


def test_stop_sequence_truncates_before_the_sequence(engine):
    ref = engine.generate([PROMPTS[1]], greedy(20))[0].tokens
    seq = tuple(ref[6:9])
    first = next(i for i in range(len(ref)) if tuple(ref[i : i + 3]) == seq)
    out = engine.generate([PROMPTS[1]], greedy(20, stop_sequences=((VOCAB - 1, VOCAB - 1), seq)))[0]
    assert out.tokens == ref[:first] and out.finish_reason == "stop"
    assert len(out.logprobs) == first


# ---- sampling -------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    params = SamplingParams(max_new_tokens=24, temperature=1.5, seed=123)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    c = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.5, seed=124))
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]
    # a seeded request does not depend on what else is in the batch
    assert engine.generate([PROMPTS[2]], params)[0].tokens == a[2].tokens


def test_filter_logits_top_p_keeps_smallest_set_with_enough_mass():
    probs = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])  # sorted: 0.5, 0.2, 0.15, 0.1, 0.05
    logits = probs.log()[None]

    def kept(**kw):
        return set(torch.nonzero(filter_logits(logits, **kw)[0] > float("-inf")).flatten().tolist())

    assert kept(top_p=0.3) == {1}  # 0.5 >= 0.3
    assert kept(top_p=0.65) == {1, 3}  # 0.5 < 0.65 <= 0.7
    assert kept(top_p=0.9) == {1, 3, 4, 0}  # 0.85 < 0.9 <= 0.95
    assert kept(top_p=1.0) == {0, 1, 2, 3, 4}
    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=3, top_p=0.6) == {1, 3}  # after top-3: 0.5/0.85 = 0.59 < 0.6, then + 0.2/0.85
    # kept logits are unchanged; one setting per row
    out = filter_logits(logits.expand(2, 5), top_k=torch.tensor([0, 1]), top_p=torch.tensor([0.65, 1.0]))
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])
    assert (out[0] > float("-inf")).sum() == 2 and (out[1] > float("-inf")).sum() == 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_plain_forward_pass(model, engine, temperature):
    """PPO recomputes log-probs with model(prompt + response); at temperature 1 they must match the engine's."""
    params = SamplingParams(max_new_tokens=20, temperature=temperature, top_p=0.9, seed=7)
    for prompt, out in zip(PROMPTS, engine.generate(PROMPTS, params)):
        ref = full_logprobs(model, prompt, out.tokens, temperature)
        torch.testing.assert_close(torch.tensor(out.logprobs), ref, atol=1e-4, rtol=0)


# ---- streaming ------------------------------------------------------------------------------


def test_stream_yields_the_same_tokens_as_generate(engine):
    ref = engine.generate(PROMPTS, greedy(16))
    params = [
        greedy(16, stop_sequences=(tuple(ref[0].tokens[4:6]),)),
        greedy(16, stop_token_ids=(ref[1].tokens[2],)),
        SamplingParams(max_new_tokens=16, temperature=1.0, seed=5, stop_sequences=((1, 2, 3), (4,))),
        greedy(5),
    ]
    outs = engine.generate(PROMPTS, params)
    streamed = [[] for _ in PROMPTS]
    for step in engine.stream(PROMPTS, params):
        assert step, "a step with nothing released is not yielded"
        for row, token, logprob in step:
            streamed[row].append((token, logprob))
    for out, got in zip(outs, streamed):
        assert [t for t, _ in got] == out.tokens
        assert [lp for _, lp in got] == pytest.approx(out.logprobs, abs=1e-6)


# ---- context length -------------------------------------------------------------------------


def test_a_flat_list_of_ids_is_a_clear_error(engine):
    with pytest.raises(ValueError, match=r"prompts must be a list of prompts, each a list of token ids .* got int 5"):
        engine.generate([5, 17, 42], greedy(4))


def test_context_overflow_raises_a_clear_error(engine):
    ctx = engine.config.max_seq_len  # 128 for the tiny preset
    with pytest.raises(ValueError, match=rf"120 tokens \+ max_new_tokens 20 = 140 .* context of {ctx}"):
        engine.generate([[1] * 120], greedy(20))
    with pytest.raises(ValueError, match=rf"prompt of {ctx + 2} tokens is longer than the model's context of {ctx}"):
        engine.generate([[1] * (ctx + 2)], greedy(1))
    with pytest.raises(ValueError, match="context"):
        engine.stream([[1] * 120], greedy(20))  # raised at the call, before iterating
    fitted = engine.clamp_max_new_tokens([1] * 120, greedy(20))
    assert fitted.max_new_tokens == ctx - 120
    out = engine.generate([[1] * 120], fitted)[0]
    assert len(out.tokens) == ctx - 120 and out.finish_reason == "length"


# ---- inference copies -----------------------------------------------------------------------


def test_packed_fp32_copy_matches_the_model(model, engine):
    """The fp32 copy's linears are packed for oneDNN on every CPU (with AVX2 as without it) and decode as the
    plain model does."""
    fast = Engine(model, dtype=torch.float32)
    assert any(isinstance(m, PackedLinear) for m in fast.sync().modules())
    a, b = engine.generate(PROMPTS, greedy(12)), fast.generate(PROMPTS, greedy(12))
    assert [x.tokens for x in a] == [x.tokens for x in b]
    torch.testing.assert_close(torch.tensor([x.logprobs for x in a]), torch.tensor([x.logprobs for x in b]),
                               atol=1e-4, rtol=0)


def test_bf16_copy_follows_weight_updates():
    model = make_model()
    engine = Engine(model, dtype=torch.bfloat16)
    before = engine.generate(PROMPTS, greedy(8))
    assert all(len(c.tokens) == 8 for c in before)
    # bf16 agrees with fp32 on these peaked distributions at least for the first token
    assert [c.tokens[0] for c in before] == [c.tokens[0] for c in Engine(model).generate(PROMPTS, greedy(1))]
    with torch.no_grad():
        model.embed.weight.mul_(-1.0)  # an in-place update, as an optimizer step makes
    after = engine.generate(PROMPTS, greedy(8))
    fresh = Engine(model, dtype=torch.bfloat16).generate(PROMPTS, greedy(8))
    assert [c.tokens for c in after] == [c.tokens for c in fresh] != [c.tokens for c in before]


def test_bf16_copy_follows_a_fused_adamw_step():
    """Fused AdamW updates parameters without moving their version counters; the copy must still follow."""
    model = make_model()
    engine = Engine(model, dtype=torch.bfloat16)
    before = engine.generate(PROMPTS, greedy(8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    versions = [p._version for p in model.parameters()]
    model(torch.tensor([PROMPTS[1]])).logsumexp(-1).sum().backward()
    optimizer.step()
    fresh = Engine(model, dtype=torch.bfloat16).generate(PROMPTS, greedy(8))
    assert [c.tokens for c in fresh] != [c.tokens for c in before]  # the step changed the model's outputs
    assert [c.tokens for c in engine.generate(PROMPTS, greedy(8))] == [c.tokens for c in fresh]
    if [p._version for p in model.parameters()] != versions:
        pytest.skip("this torch's fused AdamW bumps version counters: the trap this test pins is gone")


# ---- LoRA adapters (palmchat.model.lora) ------------------------------------------------------


def test_per_row_adapters_follow_their_rows_and_copies_follow_the_active_adapter():
    from palmchat.model.lora import add_lora, lora_layers, set_adapter, set_row_adapters, use_adapter

    model = make_model()
    add_lora(model, "a", rank=4, alpha=8)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["a"].normal_(std=0.5)  # a fresh adapter is a no-op: make it matter
    engine = Engine(model)
    prompts = PROMPTS[:3]
    params = [greedy(3), greedy(12), greedy(7)]  # rows finish at different steps: the batch is compacted
    set_row_adapters(model, ["a", None, "a"])
    batched = engine.generate(prompts, params)
    for prompt, p, name, out in zip(prompts, params, ["a", None, "a"], batched):
        with use_adapter(model, name):
            assert engine.generate([prompt], p)[0].tokens == out.tokens
    assert [m.row_slots.tolist() for _, m in lora_layers(model)][0] == [0, -1, 0]  # restored afterwards
    # an inference copy applies whichever adapter the model has active now
    fast = Engine(model, dtype=torch.float32)
    for name in ("a", None):
        set_adapter(model, name)
        want = [c.tokens for c in engine.generate(prompts, greedy(6))]
        assert [c.tokens for c in fast.generate(prompts, greedy(6))] == want
    set_adapter(model, "a")
    with_a = engine.generate(prompts, greedy(6))
    set_adapter(model, None)
    assert [c.tokens for c in with_a] != [c.tokens for c in engine.generate(prompts, greedy(6))]


@pytest.mark.parametrize("overrides", [{"tie_embeddings": False},
                                       {"block": "sequential", "n_kv_heads": 2, "norm": "rmsnorm"}])
def test_packed_copy_matches_other_model_variants(overrides):
    model = make_model(**overrides)
    a = Engine(model).generate(PROMPTS, greedy(10))
    b = Engine(model, dtype=torch.float32).generate(PROMPTS, greedy(10))
    assert [x.tokens for x in a] == [x.tokens for x in b]


# ---- int8 weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("overrides", [{}, {"block": "sequential", "n_kv_heads": 2, "tie_embeddings": False}])
def test_quantized_engine_decodes_what_its_quantized_weights_say(overrides, quantize):
    """quantize="int8" or "int4": every linear layer and the output projection of the inference copy hold int8
    (or 4-bit) weights; the greedy tokens (batched, with the KV cache, prefill and decode steps) and their log-probs
    are those of one plain float64 forward pass of the model with those weights dequantized, within bf16
    activations' rounding (logits of this peaked model reach ~20, where a bf16 step is 0.125)."""
    import copy

    from torch import nn

    from palmchat.kernels.cpu_linear import Int4Linear, Int8Linear, quantized_linear

    model = make_model(**overrides)
    engine = Engine(model, dtype=torch.bfloat16, quantize=quantize)
    outs = engine.generate(PROMPTS, greedy(12))
    runner = engine.sync()
    kind = Int8Linear if quantize == "int8" else Int4Linear
    assert not any(isinstance(m, nn.Linear) for name, m in runner.named_modules() if name != "lm_head")
    assert isinstance(engine.packed_head, kind) and any(isinstance(m, kind) for m in runner.modules())

    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(quantized_linear(module.weight.to(torch.bfloat16), None, quantize).dequantized())
        head = engine.packed_head.dequantized().double()
    for prompt, out in zip(PROMPTS, outs):
        seq = torch.tensor([prompt + out.tokens])
        with torch.no_grad():
            logp = F.linear(reference.hidden_states(seq), head)[0, len(prompt) - 1:-1].log_softmax(-1)
        torch.testing.assert_close(torch.tensor(out.logprobs, dtype=torch.float64),
                                   logp.gather(-1, torch.tensor(out.tokens)[:, None])[:, 0], atol=0.05, rtol=0.1)
        top2 = logp.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.5  # where the choice is not a near-tie under bf16 rounding
        assert (logp.argmax(-1)[clear] == torch.tensor(out.tokens)[clear]).all()


def test_int8_linear_rounds_each_row_to_its_own_scale():
    """Each row's scale is its largest |w| / 127; every weight is within half a step of its int8 value; the few-row
    kernel and the widened-weight path compute x @ dequantized.T alike."""
    from palmchat.kernels.cpu_linear import INT8_KERNEL_ROWS, Int8Linear

    torch.manual_seed(0)
    w = torch.randn(40, 24) * torch.logspace(-2, 1, 40)[:, None]  # rows of very different sizes
    w[3] = 0.0
    layer = Int8Linear(w.to(torch.bfloat16))
    scale = layer.scale.float()
    assert layer.qweight.dtype == torch.int8 and int(layer.qweight.abs().max()) == 127
    assert torch.equal(layer.qweight[3], torch.zeros(24, dtype=torch.int8))
    # half a step of the row's scale, plus the rounding of q * scale to bf16
    error = (layer.dequantized().float() - w.to(torch.bfloat16).float()).abs()
    assert (error <= 0.5 * scale[:, None] + 2**-8 * w.abs() + 1e-6).all()
    for rows in (1, INT8_KERNEL_ROWS, 3 * INT8_KERNEL_ROWS):
        x = torch.randn(rows, 24, dtype=torch.bfloat16)
        exact = F.linear(x.double(), layer.dequantized().double())
        torch.testing.assert_close(layer(x).double(), exact, atol=0.02 * float(exact.abs().max()), rtol=0.01)
