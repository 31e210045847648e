"""Tests for the sampling controls of palmchat.inference.engine (Sampler, SamplingParams): penalties, logit bias,
min-p, logits processors and OpenAI's log-probs, on hand-computed tiny logits and a tiny random model."""

import math

import pytest
import torch

from palmchat.inference.engine import Engine, Row, Sampler, SamplingParams, filter_logits
from palmchat.inference.scheduler import Scheduler
from palmchat.model.config import preset
from palmchat.model.logprobs import response_logprobs
from palmchat.model.transformer import Transformer

VOCAB = 97
PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=VOCAB, init_std=0.3)).eval()


def row(prompt=(), tokens=(), **kw) -> Row:
    r = Row(SamplingParams(**kw), list(prompt))
    r.tokens = list(tokens)
    return r


LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])


def test_frequency_and_presence_penalties_follow_openai_definition():
    # output so far: token 3 twice, token 2 once -> mu - c * freq - (c > 0) * presence
    sampler = Sampler([row(prompt=[0, 1], tokens=[3, 2, 3], frequency_penalty=0.5, presence_penalty=0.25)], "cpu")
    adjusted = sampler.adjust(LOGITS)
    expected = torch.tensor([[2.0, -1.0, 0.5 - 0.5 - 0.25, 3.0 - 1.0 - 0.25, 0.0]])  # the prompt's 0, 1 untouched
    torch.testing.assert_close(adjusted, expected)


def test_repetition_penalty_follows_vllm_definition_over_prompt_and_output():
    # seen: 1 (prompt), 3 (output); a positive logit is divided, a negative one multiplied
    sampler = Sampler([row(prompt=[1], tokens=[3], repetition_penalty=2.0)], "cpu")
    expected = torch.tensor([[2.0, -2.0, 0.5, 1.5, 0.0]])
    torch.testing.assert_close(sampler.adjust(LOGITS), expected)


def test_logit_bias_is_added_and_minus_100_bans():
    sampler = Sampler([row(logit_bias={0: -5.0, 4: 1.5, 3: -100})], "cpu")
    adjusted = sampler.adjust(LOGITS)
    assert adjusted[0, 3] == float("-inf")
    torch.testing.assert_close(adjusted[0, [0, 1, 2, 4]], torch.tensor([-3.0, -1.0, 0.5, 1.5]))


def test_penalties_count_each_sampled_token_incrementally():
    sampler = Sampler([row(frequency_penalty=1.0, temperature=0)], "cpu")
    logits = torch.tensor([[5.0, 4.5, 0.0]])
    picks = [int(sampler(logits).tokens[0]) for _ in range(3)]
    # 0 (5 > 4.5), then 1 (5 - 1 < 4.5), then 0 (4 > 3.5)
    assert picks == [0, 1, 0]
    assert sampler.counts.tolist() == [[2.0, 1.0, 0.0]]


def test_a_banned_token_is_never_sampled_even_when_most_likely():
    logits = torch.tensor([[10.0, 0.0, 0.0]]).expand(64, 3).contiguous()
    rows = [row(logit_bias={0: -100}, seed=s, temperature=2.0) for s in range(64)]
    for _ in range(5):
        assert 0 not in Sampler(rows, "cpu")(logits).tokens.tolist()


def test_min_p_keeps_tokens_at_least_min_p_times_the_most_likely():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])
    kept = filter_logits(probs.log(), min_p=0.2) > float("-inf")  # threshold 0.1
    assert kept.tolist() == [[True, True, True, False]]


def test_reported_logprobs_are_raw_distribution_before_penalties_and_temperature():
    sampler = Sampler([row(logprobs=2, temperature=0.5, presence_penalty=2.0, tokens=[3], seed=1)], "cpu")
    out = sampler(LOGITS)
    raw = LOGITS.log_softmax(-1)[0]
    token = int(out.tokens[0])
    assert out.reported[0].logprob == pytest.approx(float(raw[token]))
    assert [t for t, _ in out.reported[0].top] == [3, 0]
    assert out.reported[0].top[0][1] == pytest.approx(float(raw[3]))


class EvenTokensOnly:
    """A logits processor: only even token ids, and it records what it was told."""

    def __init__(self):
        self.seen = []

    def allowed(self, tokens):
        assert tokens == self.seen  # it sees the row's output so far
        return torch.arange(VOCAB) % 2 == 0

    def advance(self, token):
        self.seen.append(token)


def test_logits_processor_constrains_every_step_of_every_row(model):
    engine = Engine(model)
    made = []

    def new():
        made.append(EvenTokensOnly())
        return made[-1]

    params = SamplingParams(max_new_tokens=12, temperature=1.5, seed=3, new_logits_processor=new)
    outs = engine.generate(PROMPTS, params)
    assert len(made) == len(PROMPTS)  # one processor per row
    for out, processor in zip(outs, made):
        assert all(t % 2 == 0 for t in out.tokens) and processor.seen == out.tokens


def test_batched_rows_with_different_settings_equal_each_alone(model):
    engine = Engine(model)
    params = [SamplingParams(max_new_tokens=10, temperature=0.9, seed=1, frequency_penalty=1.5, logprobs=3),
              SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.7, logit_bias={7: 3.0}),
              SamplingParams(max_new_tokens=10, temperature=1.2, seed=2, min_p=0.1, presence_penalty=-1.0, top_k=20)]
    batched = engine.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, batched):
        alone = engine.generate([prompt], p)[0]
        assert out.tokens == alone.tokens
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)
    assert batched[0].token_logprobs is not None and batched[1].token_logprobs is None


def test_penalties_change_what_is_sampled(model):
    engine = Engine(model)
    plain = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=0))
    penalised = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=0, frequency_penalty=2.0,
                                                        presence_penalty=2.0))
    assert any(len(set(o.tokens)) < 16 for o in plain)  # greedy on a random model repeats itself
    assert [len(set(o.tokens)) for o in penalised] > [len(set(o.tokens)) for o in plain]


def test_reported_logprobs_sum_to_the_sequence_logprob(model):
    engine = Engine(model)
    out = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=0.7, seed=5, logprobs=5,
                                                       repetition_penalty=1.3))[0]
    ids = torch.tensor([PROMPTS[0] + out.tokens])
    with torch.no_grad():
        total = response_logprobs(model, ids, torch.tensor([3]), torch.tensor([ids.shape[1]]), reduce="sum")
    assert sum(t.logprob for t in out.token_logprobs) == pytest.approx(float(total[0]), abs=1e-4)
    for t in out.token_logprobs:
        assert len(t.top) == 5 and t.top[0][1] >= t.logprob - 1e-6
        assert sum(math.exp(lp) for _, lp in t.top) <= 1 + 1e-5


def test_scheduler_keeps_counts_when_the_batch_changes(model):
    """The scheduler rebuilds its sampler whenever a row joins or leaves; the penalised rows must sample what the
    engine samples for them alone."""
    import asyncio

    params = [SamplingParams(max_new_tokens=n, temperature=0, frequency_penalty=1.0, logprobs=1) for n in (4, 9, 14)]
    expected = [Engine(model).generate([p], s)[0] for p, s in zip(PROMPTS, params)]

    async def run():
        scheduler = Scheduler(model, max_batch=4).start()
        try:
            async def one(prompt, p):
                tokens, reported = [], []
                async for event in scheduler.stream(prompt, p):
                    tokens += event.tokens
                    reported += event.reported
                return tokens, reported

            return await asyncio.gather(*(one(pr, p) for pr, p in zip(PROMPTS, params)))
        finally:
            scheduler.stop()

    for (tokens, reported), want in zip(asyncio.run(run()), expected):
        assert tokens == want.tokens
        assert [r.logprob for r in reported] == pytest.approx([r.logprob for r in want.token_logprobs], abs=1e-5)


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0),
                                 dict(min_p=1.5), dict(logprobs=21), dict(logit_bias={1: 101}),
                                 dict(logit_bias={i: 1 for i in range(301)})])
def test_out_of_range_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


class NothingAllowed:
    def allowed(self, tokens):
        return torch.zeros(VOCAB, dtype=torch.bool)

    def advance(self, token):
        pass


def test_a_row_left_with_no_token_stops_instead_of_failing_the_batch(model):
    engine = Engine(model)
    dead = SamplingParams(max_new_tokens=5, temperature=1.0, seed=0, stop_token_ids=(3,),
                          new_logits_processor=NothingAllowed)
    banned = SamplingParams(max_new_tokens=5, temperature=1.0, seed=0, logit_bias={t: -100 for t in range(VOCAB)})
    fine = SamplingParams(max_new_tokens=5, temperature=0)
    outs = engine.generate(PROMPTS, [dead, banned, fine])
    assert outs[0].tokens == [3] and outs[0].finish_reason == "stop"  # only its stop token was left
    assert len(outs[1].tokens) == 5  # no stop token: it samples unconstrained rather than from NaNs
    assert outs[2].tokens == engine.generate([PROMPTS[2]], fine)[0].tokens


class FailsAtStep3:
    def __init__(self):
        self.steps = 0

    def allowed(self, tokens):
        self.steps += 1
        if self.steps == 3:
            raise RuntimeError("grammar bug")
        return None

    def advance(self, token):
        pass


def test_a_failing_logits_processor_fails_its_request_only(model):
    import asyncio

    healthy = SamplingParams(max_new_tokens=8, temperature=0)
    broken = SamplingParams(max_new_tokens=8, temperature=0, new_logits_processor=FailsAtStep3)

    async def run():
        scheduler = Scheduler(model, max_batch=4).start()
        try:
            async def one(prompt, p):
                tokens, finish, request = [], None, None
                async for event in scheduler.stream(prompt, p):
                    tokens += event.tokens
                    finish, request = event.request.finish_reason, event.request
                return tokens, finish, request.error

            return await asyncio.gather(one(PROMPTS[0], broken), one(PROMPTS[1], healthy))
        finally:
            scheduler.stop()

    (bad_tokens, bad_finish, error), (good_tokens, good_finish, _) = asyncio.run(run())
    assert bad_finish == "error" and "RuntimeError" in error and len(bad_tokens) == 2
    assert good_finish == "length" and good_tokens == Engine(model).generate([PROMPTS[1]], healthy)[0].tokens
    with pytest.raises(RuntimeError, match="grammar bug"):  # the engine, offline, raises it
        Engine(model).generate([PROMPTS[0]], broken)
