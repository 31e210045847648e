"""Continuous batching and the prefix cache (palmchat.inference.scheduler) against the plain Engine: whatever the
batch around a request, whatever it reused from the cache, its tokens are the ones it would get alone."""

import asyncio
import threading

import pytest
import torch

from palmchat.inference.engine import Engine, SamplingParams
from palmchat.inference.prefix_cache import PrefixCache
from palmchat.inference.scheduler import Scheduler
from palmchat.model.config import preset
from palmchat.model.lora import add_lora, use_adapter
from palmchat.model.transformer import Transformer

pytestmark = pytest.mark.kernels  # the bf16 inference copies: packed linears, C kernels

VOCAB = 97
PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [int(t) for t in torch.arange(17) * 5 % VOCAB],
           [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]  # the last shares 9 tokens with the second


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=VOCAB, init_std=0.3, **overrides)).eval()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


class Collector:
    """Submits requests and waits for them to finish (the scheduler calls on_event from its own thread)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler, self.done, self.events = scheduler, threading.Event(), {}
        self.pending = 0
        self.lock = threading.Lock()

    def submit(self, prompt, params, adapter=None):
        with self.lock:
            self.pending += 1
            self.done.clear()

        def on_event(ev):
            self.events.setdefault(id(ev.request), []).append(ev)
            if ev.finished:
                with self.lock:
                    self.pending -= 1
                    if self.pending == 0:
                        self.done.set()

        return self.scheduler.submit(prompt, params, on_event, adapter=adapter)

    def wait(self, timeout=30):
        assert self.done.wait(timeout), "requests did not finish"


@pytest.fixture
def model():
    return make_model()


def run_all(scheduler, prompts, params):
    c = Collector(scheduler)
    requests = [c.submit(p, q) for p, q in zip(prompts, params)]
    c.wait()
    return requests, c


@pytest.mark.parametrize("overrides", [{}, {"block": "sequential", "n_kv_heads": 2}])
def test_concurrent_greedy_requests_equal_each_alone(overrides):
    model = make_model(**overrides)
    engine = Engine(model)
    lengths = [12, 3, 20, 7, 9]  # rows leave the batch at different steps
    scheduler = Scheduler(model, max_batch=3, prefill_chunk=4).start()  # more requests than rows: some wait
    try:
        requests, collector = run_all(scheduler, PROMPTS, [greedy(n) for n in lengths])
    finally:
        scheduler.stop()
    for prompt, n, r in zip(PROMPTS, lengths, requests):
        alone = engine.generate([prompt], greedy(n))[0]
        assert r.tokens == alone.tokens and r.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0)
        streamed = [t for ev in collector.events[id(r)] for t in ev.tokens]
        assert streamed == r.tokens and collector.events[id(r)][-1].finished
    assert scheduler.counters["decode_rows_total"] > scheduler.counters["decode_steps_total"]  # really batched


def test_follow_up_turn_reuses_the_conversation_and_matches_no_cache(model):
    engine = Engine(model)
    scheduler = Scheduler(model).start()
    try:
        (first,), _ = run_all(scheduler, [PROMPTS[1]], [greedy(10)])
        assert first.cached_tokens == 0
        follow_up = PROMPTS[1] + first.tokens + [7, 8, 9]
        (second,), _ = run_all(scheduler, [follow_up], [greedy(10)])
        # every token fed to the model before is reused: the prompt and all sampled tokens but the last
        assert second.cached_tokens == len(PROMPTS[1]) + len(first.tokens) - 1
        assert second.tokens == engine.generate([follow_up], greedy(10))[0].tokens
        # a prompt that agrees with a cached sequence on a part of it reuses that part
        (third,), _ = run_all(scheduler, [PROMPTS[1][:5] + [50, 51]], [greedy(4)])
        assert third.cached_tokens == 5
        assert third.tokens == engine.generate([PROMPTS[1][:5] + [50, 51]], greedy(4))[0].tokens
    finally:
        scheduler.stop()
    assert scheduler.counters["cached_tokens_total"] == second.cached_tokens + third.cached_tokens


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    params = SamplingParams(max_new_tokens=15, temperature=1.0, top_p=0.9, seed=123)
    scheduler = Scheduler(model, prefix_cache_tokens=0).start()
    try:
        (alone,), _ = run_all(scheduler, [PROMPTS[0]], [params])
        crowd, _ = run_all(scheduler, [PROMPTS[0]] + PROMPTS[1:],
                           [params] + [SamplingParams(max_new_tokens=n, temperature=1.0) for n in (3, 9, 5, 1)])
    finally:
        scheduler.stop()
    assert crowd[0].tokens == alone.tokens
    assert alone.tokens == Engine(model).generate([PROMPTS[0]], params)[0].tokens


def test_stop_tokens_and_sequences_end_requests(model):
    engine = Engine(model)
    ref = engine.generate([PROMPTS[3]], greedy(12))[0].tokens
    stop_token = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(ref[4],))
    stop_seq = SamplingParams(max_new_tokens=12, temperature=0, stop_sequences=(tuple(ref[6:8]),))
    scheduler = Scheduler(model).start()
    try:
        (a, b), _ = run_all(scheduler, [PROMPTS[3], PROMPTS[3]], [stop_token, stop_seq])
    finally:
        scheduler.stop()
    assert a.tokens == ref[: ref.index(ref[4]) + 1] and a.finish_reason == "stop"
    assert b.tokens == engine.generate([PROMPTS[3]], stop_seq)[0].tokens and b.finish_reason == "stop"


def test_cancel_leaves_the_others_running(model):
    scheduler = Scheduler(model).start()
    c = Collector(scheduler)
    try:
        long = c.submit(PROMPTS[0], greedy(100))
        short = c.submit(PROMPTS[1], greedy(30))
        long.cancel()
        c.wait()
    finally:
        scheduler.stop()
    assert long.finish_reason == "cancelled" and len(long.tokens) < 100
    assert short.finish_reason == "length"
    assert short.tokens == Engine(model).generate([PROMPTS[1]], greedy(30))[0].tokens


def test_async_stream_cancels_when_the_consumer_leaves(model):
    scheduler = Scheduler(model).start()

    async def consume():
        seen = []
        async for ev in scheduler.stream(PROMPTS[2], greedy(100)):
            seen.append(ev)
            if sum(len(e.tokens) for e in seen) >= 3:
                break  # the client went away
        return seen[0].request

    try:
        request = asyncio.run(consume())
        for _ in range(200):
            if request.finish_reason:
                break
            threading.Event().wait(0.01)
    finally:
        scheduler.stop()
    assert request.finish_reason == "cancelled" and len(request.tokens) < 100


def test_per_row_adapters_in_one_batch_equal_each_alone():
    model = make_model()
    for name in ("a", "b"):
        add_lora(model, name, rank=4)
        for n, p in model.named_parameters():
            if f"lora_B.{name}" in n:
                torch.nn.init.normal_(p, std=0.5)  # B starts at zero; make the adapters differ
    engine = Engine(model)
    scheduler = Scheduler(model).start()
    c = Collector(scheduler)
    try:
        rows = [(PROMPTS[0], "a"), (PROMPTS[0], "b"), (PROMPTS[0], None), (PROMPTS[1], "a")]
        requests = [c.submit(p, greedy(8), adapter=a) for p, a in rows]
        c.wait()
        with pytest.raises(ValueError, match="unknown adapter"):
            scheduler.submit(PROMPTS[0], greedy(2), lambda ev: None, adapter="nope")
    finally:
        scheduler.stop()
    outs = []
    for (prompt, adapter), r in zip(rows, requests):
        with use_adapter(model, adapter):
            expected = engine.generate([prompt], greedy(8))[0].tokens
        assert r.tokens == expected
        outs.append(r.tokens)
    assert len({tuple(t) for t in outs[:3]}) == 3  # the adapters really differ: the cache is kept apart per adapter


def test_bad_requests_are_refused_at_submit(model):
    scheduler = Scheduler(model)
    with pytest.raises(ValueError, match="empty prompt"):
        scheduler.submit([], greedy(2), lambda ev: None)
    with pytest.raises(ValueError, match="context"):
        scheduler.submit([1] * 100, greedy(100), lambda ev: None)


def test_prefix_cache_budget_lru_and_subsumed_entries():
    cache = PrefixCache(max_tokens=10)

    def kv(n):
        return torch.zeros(1, 1, n, 2)

    cache.insert(None, torch.tensor([1, 2, 3]), kv(3), kv(3))
    cache.insert(None, torch.tensor([1, 2, 3, 4, 5]), kv(5), kv(5))  # extends the first: replaces it
    assert cache.tokens == 5 and len(cache.entries) == 1
    cache.insert(None, torch.tensor([1, 2]), kv(2), kv(2))  # already covered
    assert cache.tokens == 5
    cache.insert("lora", torch.tensor([1, 2, 3]), kv(3), kv(3))  # another adapter: its own entry
    assert cache.lookup(None, torch.tensor([1, 2, 3, 9]), limit=4)[1] == 3
    cache.insert(None, torch.tensor([7, 7, 7, 7]), kv(4), kv(4))  # over budget: the least recently used goes
    assert cache.tokens <= 10
    assert cache.lookup("lora", torch.tensor([1, 2, 3]), limit=3)[1] == 0
    assert cache.lookup(None, torch.tensor([1, 2, 3, 4, 5, 6]), limit=5)[1] == 5


# -- limits, fair admission, faults ---------------------------------------------------------------------------


def test_queue_and_per_owner_limits_refuse_with_a_status(model):
    from palmchat.inference.scheduler import Refused

    scheduler = Scheduler(model, max_queue=3, max_requests_per_owner=1)  # not started: everything waits
    c = Collector(scheduler)
    scheduler.submit_all(PROMPTS[0], [(greedy(3, cache_salt="a"), lambda ev: None)] * 2)  # n=2 counts once
    with pytest.raises(Refused) as busy:
        c.submit(PROMPTS[0], greedy(3, cache_salt="a"))
    assert busy.value.status == 429 and "--max-requests-per-key" in str(busy.value) and busy.value.retry_after > 0
    c.submit(PROMPTS[1], greedy(3, cache_salt="b"))  # another key still gets through
    with pytest.raises(Refused) as full:
        c.submit(PROMPTS[1], greedy(3, cache_salt="c"))
    assert full.value.status == 503 and "--max-queue" in str(full.value)
    assert scheduler.counters["refused_total"] == 2
    scheduler.drain()
    with pytest.raises(Refused) as draining:
        c.submit(PROMPTS[1], greedy(3, cache_salt="d"))
    assert draining.value.status == 503


def test_a_finished_request_frees_its_owners_slot(model):
    scheduler = Scheduler(model, max_requests_per_owner=1).start()
    try:
        for _ in range(3):  # one at a time, each after the last finished
            (r,), _ = run_all(scheduler, [PROMPTS[2]], [greedy(3, cache_salt="a")])
            assert r.finish_reason == "length"
        c = Collector(scheduler)
        r = c.submit(PROMPTS[2], greedy(100, cache_salt="a"))
        r.cancel()  # cancelled also frees it
        c.wait()
        run_all(scheduler, [PROMPTS[2]], [greedy(3, cache_salt="a")])
    finally:
        scheduler.stop()


def test_admission_is_fair_across_owners_not_first_come(model):
    scheduler = Scheduler(model, max_batch=2)  # not started: all four are queued before the first admission
    c = Collector(scheduler)
    a = [c.submit(PROMPTS[i], greedy(4 if i == 0 else 20, cache_salt="a")) for i in range(3)]
    b = c.submit(PROMPTS[3], greedy(20, cache_salt="b"))
    scheduler.start()
    try:
        c.wait()
    finally:
        scheduler.stop()
    # first come, first served would run a[0] and a[1] together and b only after a[0] finished
    assert b.first_token < a[1].first_token < a[2].first_token


def test_a_per_owner_row_cap_keeps_one_requests_samples_from_taking_the_batch(model):
    scheduler = Scheduler(model, max_batch=4, max_rows_per_owner=1).start()
    c = Collector(scheduler)
    try:
        group = [c.submit(PROMPTS[1], greedy(6, cache_salt="a")) for _ in range(3)]
        other = c.submit(PROMPTS[2], greedy(6, cache_salt="b"))
        c.wait()
    finally:
        scheduler.stop()
    assert all(r.finish_reason == "length" for r in group + [other])
    # never more than one row of "a" and one of "b" decoding together, though the batch has room for four
    assert scheduler.counters["decode_rows_total"] <= 2 * scheduler.counters["decode_steps_total"]


def faulty(model, fails):
    """Make the model's forward raise (as an out-of-memory would) when fails(idx, cache) is true."""
    forward = model.hidden_states

    def hidden_states(idx, cache=None, **kw):
        if fails(idx, cache):
            raise RuntimeError("CUDA out of memory (injected)")
        return forward(idx, cache=cache, **kw)

    model.hidden_states = hidden_states


LONG = [int(t) for t in torch.arange(40) * 7 % VOCAB]  # longer than every prompt of PROMPTS


def test_a_fault_in_one_prefill_fails_only_that_request(model):
    engine = Engine(model)
    expected = [engine.generate([p], greedy(12))[0].tokens for p in PROMPTS[:3]]
    faulty(model, lambda idx, cache: idx.shape[1] >= len(LONG))  # the long prompt's prefill
    scheduler = Scheduler(model, prefill_chunk=64).start()
    try:
        c = Collector(scheduler)
        others = [c.submit(p, greedy(12)) for p in PROMPTS[:2]]
        bad = c.submit(LONG, greedy(12))
        others.append(c.submit(PROMPTS[2], greedy(12)))
        c.wait()
        (after,), _ = run_all(scheduler, [PROMPTS[0]], [greedy(12)])  # the scheduler goes on
    finally:
        scheduler.stop()
    assert bad.finish_reason == "error" and "RuntimeError" in bad.error and "memory" not in bad.error
    assert [r.tokens for r in others] == expected and all(r.finish_reason == "length" for r in others)
    assert after.tokens == expected[0] and scheduler.counters["failed_total"] == 1


def test_a_fault_in_one_decode_row_fails_only_that_row(model):
    engine = Engine(model)
    expected = [engine.generate([p], greedy(12))[0].tokens for p in PROMPTS[:3]]
    # a decode step fails whenever the long request's row is in it, from its third token on
    faulty(model, lambda idx, cache: idx.shape[1] == 1 and cache is not None
           and bool((cache.lengths >= len(LONG) + 3).any()))
    scheduler = Scheduler(model).start()
    try:
        c = Collector(scheduler)
        bad = c.submit(LONG, greedy(12))
        others = [c.submit(p, greedy(12)) for p in PROMPTS[:3]]
        c.wait()
    finally:
        scheduler.stop()
    assert bad.finish_reason == "error" and 1 <= len(bad.tokens) < 12
    assert [r.tokens for r in others] == expected and all(r.finish_reason == "length" for r in others)
