"""From a prompt's token ids to the text of n replies, through the scheduler, and the moderation of what goes in
and comes out: what every generating endpoint shares (chat completions, completions, responses, compare).

    gen = Generation(state, prompt_ids, params, n=2, stops=["\\n\\n"], block_output=True)
    async for index, delta, finish_reason in gen.deltas():   # closing the loop early cancels the requests
        ...
    gen.replies[0].text, gen.replies[0].context_tokens(), gen.cached_tokens, gen.completion_tokens

Each reply's text is released only when it is final:
- whole characters only: byte-level BPE splits multi-byte characters across tokens, so a tail that decodes to
  U+FFFD waits for the next tokens (up to 4: a character has at most 4 bytes);
- stop strings are matched on text, not tokens (a stop string need not start on a token boundary), and a tail
  that may be the start of one is held back; the request is cancelled at the match. Only the text not yet
  released is searched (a stop never starts in released text: it would have been held back), so the work per
  token is bounded by the stops' length, not the reply's;
- with output moderation in block mode, text leaves only after the whole reply so far passed the moderator,
  checked every `CHECK_EVERY` tokens and at the end, in a worker thread so that the event loop serving every
  other stream does not wait for it (the classifier scores a text's feature set as a whole: each check scores
  the reply so far); a flagged reply stops with finish_reason "content_filter" and its unchecked tail is never
  sent.

A non-streamed generation watches its client (streaming.client_disconnected) and is cancelled when it goes away,
as a stream is. Requests the scheduler refuses for now (queue full, too many in flight for the key, draining)
are answered 503 or 429 with a retry-after header.

Sample j of a seeded request uses best_of_n.sample_seed(seed, j), as best-of-n does, so n > 1 samples differ.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator

from palmchat.inference.best_of_n import sample_seed, score_completions
from palmchat.inference.engine import SamplingParams
from palmchat.inference.scheduler import Refused
from palmchat.serve.errors import APIError
from palmchat.serve.keys import parse_rate, retry_after_header
from palmchat.serve.state import ServerState
from palmchat.serve.streaming import client_disconnected

CHECK_EVERY = 8  # tokens between output-moderation checks in block mode
WATCH_CLIENT_EVERY = 1.0  # seconds between checks that a non-streamed request's client is still connected
REFUSAL = "I can't help with that request."
MODERATION_MODEL = "palmchat-moderation"


class GenerationError(RuntimeError):
    """The scheduler failed a request (status 500), is shutting down (503), or the client went away (499)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class Reply:
    """One sampled reply: token ids in, released text out."""

    def __init__(self, tokenizer, stops: list[str], moderator=None):
        self.tokenizer, self.stops, self.moderator = tokenizer, stops, moderator
        self.tokens: list[int] = []  # content tokens: the sampled ids without end-of-turn / end-of-text
        self.reported: list = []  # per content token: its TokenLogprobs, when the request asked for logprobs
        self.generated = 0  # every sampled id, for usage
        self.decoded, self.decoded_upto = "", 0  # text of tokens[:decoded_upto], only ever appended to
        self.text = ""  # released so far: a prefix of `decoded`
        self.kept = 0  # content tokens whose text is all released (what a stored context keeps)
        self.checked = 0  # len(tokens) at the last moderation check
        self.finish_reason: str | None = None
        self.moderation = None  # the last ModerationResult of the output (block mode)

    def add(self, tokens: list[int], finish: str | None, reported: list | None = None) -> str:
        """Take newly sampled ids (finish: the scheduler's reason when this was the last event; reported: their
        log-probs, if asked for); return the text that can now be released. Sets finish_reason when the reply ends
        (possibly before the scheduler's)."""
        self.generated += len(tokens)
        if finish in ("cancelled", "error"):
            self.finish_reason = finish
            return ""
        special = self.tokenizer.chat_format.reply_stop_ids
        self.tokens += [t for t in tokens if t not in special]
        self.reported += [r for t, r in zip(tokens, reported or [None] * len(tokens)) if t not in special]
        # A character's UTF-8 bytes may span tokens (at most 4): a tail that decodes to U+FFFD waits for the next
        # token, unless 4 tokens did not complete it (then it is not a character: it is released as it is).
        tail = self.tokenizer.decode(self.tokens[self.decoded_upto:])
        if not tail.endswith("\ufffd") or finish is not None or len(self.tokens) - self.decoded_upto >= 4:
            self.decoded, self.decoded_upto = self.decoded + tail, len(self.tokens)
        new, reason, hold = self.decoded[len(self.text):], finish, 0  # decoded always extends text
        hits = [i for i in (new.find(s) for s in self.stops) if i >= 0]
        if hits:
            new, reason = new[:min(hits)], "stop"
        elif reason is None:  # hold back a tail that may be the start of a stop string
            hold = max((held_back(new, s) for s in self.stops), default=0)
        delta = new[:len(new) - hold]
        if self.moderator is not None:
            if reason is None and len(self.tokens) - self.checked < CHECK_EVERY:
                return ""
            self.checked = len(self.tokens)
            self.moderation = self.moderator.moderate([self.text + delta])[0]
            if self.moderation.flagged:
                self.finish_reason = "content_filter"
                return ""
        self.text += delta
        if not hits and hold == 0 and self.decoded_upto == len(self.tokens):
            self.kept = len(self.tokens)
        self.finish_reason = reason
        return delta

    def context_tokens(self) -> list[int]:
        """The reply as it enters a stored conversation: its released tokens, closed by end-of-turn."""
        return self.tokens[:self.kept] + self.tokenizer.chat_format.reply_end


def held_back(text: str, stop: str) -> int:
    """The length of the longest end of `text` that is the start of `stop` (but not all of it)."""
    tail = text[len(text) - len(stop) + 1:] if len(stop) > 1 else ""
    start = tail.find(stop[0])
    while start >= 0:  # each place the stop's first character appears, from the longest candidate on
        if stop.startswith(tail[start:]):
            return len(tail) - start
        start = tail.find(stop[0], start + 1)
    return 0


def take_tokens(state, owner: str | None, tokens: int) -> None:
    """Charge a generation to its key's token budget (--token-rate-limit): the prompt and the most its replies may
    take, as OpenAI counts tokens per minute at admission; a 429 with retry-after when the budget is spent."""
    rate = parse_rate(state.token_rate_limit)
    wait = state.token_limiter.take(owner or "anonymous", rate, tokens)
    if wait == math.inf:
        raise APIError(429, f"This request may use {tokens} tokens (prompt + max tokens x samples), more than this "
                            f"key's whole budget of {state.token_rate_limit} tokens (--token-rate-limit): ask for "
                            f"fewer tokens or samples", type="tokens", code="rate_limit_exceeded")
    if wait:
        raise APIError(429, f"Token rate limit reached ({state.token_rate_limit} tokens): this request may use "
                            f"{tokens}. Please try again in {wait:.1f}s.", type="tokens", code="rate_limit_exceeded",
                       headers={"retry-after": retry_after_header(wait)})


class Generation:
    """n replies to one prompt, sampled concurrently in the scheduler's batch."""

    def __init__(self, state, prompt: list[int], params: SamplingParams, n: int = 1, stops: list[str] | None = None,
                 block_output: bool = False):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prompt = prompt
        moderator = state.moderator if block_output else None
        self.replies = [Reply(state.tokenizer, stops or [], moderator) for _ in range(n)]
        self.requests = []
        latency, model = state.latency, params.adapter or state.model_id

        def on_event(j: int):
            last = [None]  # the time of the request's previous tokens (RequestLatency)

            def on(event):  # in the scheduler's thread
                if latency is not None:
                    latency.observe(event, model, last)
                loop.call_soon_threadsafe(self.queue.put_nowait, (j, event))
            return on

        samples = [(params if params.seed is None else dataclasses.replace(params, seed=sample_seed(params.seed, j)),
                    on_event(j)) for j in range(n)]
        take_tokens(state, params.cache_salt, n * (len(prompt) + params.max_new_tokens))
        try:
            self.requests = state.scheduler.submit_all(prompt, samples)
        except ValueError as e:  # the scheduler's checks: context length, token ids
            raise APIError(400, str(e), code="context_length_exceeded" if "context" in str(e) else None) from None
        except Refused as e:  # the queue is full, the key has too many in flight, or the server is draining
            raise APIError(e.status, str(e), type="requests" if e.status == 429 else "server_error", code=e.code,
                           headers={"retry-after": retry_after_header(e.retry_after)}) from None

    @property
    def cached_tokens(self) -> int:
        return self.requests[0].cached_tokens if self.requests else 0

    @property
    def completion_tokens(self) -> int:
        return sum(r.generated for r in self.replies)

    async def deltas(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(reply index, released text, finish reason or None) until every reply has finished."""
        remaining = len(self.replies)
        try:
            while remaining:
                j, event = await self.queue.get()
                reply = self.replies[j]
                if reply.finish_reason is not None:
                    continue  # ended early by a stop string or the filter; its request was cancelled
                finish = event.request.finish_reason if event.finished else None
                if reply.moderator is None:
                    delta = reply.add(event.tokens, finish, event.reported)
                else:  # the moderator's check runs off the event loop
                    delta = await asyncio.to_thread(reply.add, event.tokens, finish, event.reported)
                if reply.finish_reason == "error":
                    raise GenerationError(event.request.error or "generation failed") from event.request.exception
                if reply.finish_reason == "cancelled":
                    raise GenerationError("the server is shutting down", status=503)
                if reply.finish_reason is not None:
                    remaining -= 1
                    if not event.finished:
                        self.requests[j].cancel()
                if delta or reply.finish_reason is not None:
                    yield j, delta, reply.finish_reason
        finally:
            self.cancel()

    async def run(self) -> list[Reply]:
        """Every reply to its end. Cancelled (GenerationError 499) when the request's client goes away."""

        async def consume():
            async for _ in self.deltas():
                pass

        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=WATCH_CLIENT_EVERY)
                if not task.done() and await client_disconnected():
                    raise GenerationError("the client closed the connection", status=499)
            task.result()  # raises what the replies' generation raised
            return self.replies
        finally:
            if not task.done():
                task.cancel()
                self.cancel()

    def cancel(self) -> None:
        for r in self.requests:
            if r.finish_reason is None:
                r.cancel()


async def rank_by_mean_logprob(state, prompt: list[int], params: SamplingParams, n: int, candidates: int,
                               stops: list[str] | None = None, block_output: bool = False
                               ) -> tuple[Generation, list[int]]:
    """OpenAI's best_of without a reward model: sample `candidates` replies and return the generation and the
    indices of the n with the highest mean log-prob per token, best first."""
    params = dataclasses.replace(params, logprobs=params.logprobs or 0)  # the raw log-probs rank them
    generation = Generation(state, prompt, params, candidates, stops, block_output)
    replies = await generation.run()

    def mean(r) -> float:
        values = [t.logprob for t in r.reported if t is not None]
        return sum(values) / len(values) if values else float("-inf")

    return generation, sorted(range(candidates), key=lambda j: (-mean(replies[j]), j))[:n]


async def rank_best_of(state, prompt: list[int], params: SamplingParams, n: int, candidates: int,
                       stops: list[str] | None = None, block_output: bool = False) -> tuple[Generation, list[int]]:
    """Sample `candidates` replies, score each with the reward model (read at its end-of-turn token), and return
    the generation and the indices of the n best, best first."""
    if state.reward_model is None:
        raise APIError(400, "best-of-n needs a reward model: start the server with --reward-model", param="best_of")
    room = state.reward_model.config.max_seq_len - len(prompt) - 1  # one slot for the eot the score is read at
    if room < 1:
        raise APIError(400, f"prompt of {len(prompt)} tokens leaves no room for a reply in the reward model's "
                            f"context of {state.reward_model.config.max_seq_len} tokens", param="messages",
                       code="context_length_exceeded")
    params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, room))
    generation = Generation(state, prompt, params, candidates, stops, block_output)
    replies = await generation.run()
    scores = await asyncio.to_thread(score_completions, state.reward_model, [prompt] * candidates,
                                     [r.context_tokens() for r in replies], state.tokenizer.chat_format.eot_id)
    ranked = sorted(range(candidates), key=lambda j: (replies[j].finish_reason == "content_filter", -scores[j], j))
    return generation, ranked[:n]


async def generate_replies(state: ServerState, prompt: list[int], params: SamplingParams, n: int,
                           candidates: int | None, stops: list[str]) -> tuple[Generation, list]:
    """Non-streamed: the n replies (of `candidates` when set: the n best by the reward model, or without one by mean
    log-prob)."""
    block = state.moderation_mode == "block"
    try:
        if candidates:  # by the reward model, or (only /v1/completions allows it) by mean log-prob
            rank = rank_best_of if state.reward_model is not None else rank_by_mean_logprob
            generation, order = await rank(state, prompt, params, n, candidates, stops, block)
            return generation, [generation.replies[j] for j in order]
        generation = Generation(state, prompt, params, n, stops, block)
        return generation, await generation.run()
    except GenerationError as e:  # the scheduler's exception stays the cause, for the server's log
        raise APIError(e.status, str(e), type="server_error") from e.__cause__


# -- moderation ------------------------------------------------------------------------------------------


def moderation_result(result) -> dict:
    """A ModerationResult as the `moderation.input`/`.output` of a response (and of a chat completion here)."""
    return {"type": "moderation_result", "model": MODERATION_MODEL, **result.to_openai(),
            "category_applied_input_types": {c: ["text"] for c in result.categories}}


def moderation_results(results: list) -> dict:
    return {"type": "moderation_results", "model": MODERATION_MODEL, "results": [moderation_result(r) for r in results]}


async def moderate_input(state: ServerState, texts: list[str]):
    """The moderator's verdict on the request's text (all of it as one), or None when moderation is off."""
    if state.moderator is None or state.moderation_mode == "off" or not any(texts):
        return None
    return (await asyncio.to_thread(state.moderator.moderate, ["\n".join(texts)]))[0]


def moderate_output(state: ServerState, reply):
    """The moderator's verdict on a finished reply: checked now (warn), or the last check while generating
    (block); None when moderation is off."""
    if state.moderator is None or state.moderation_mode == "off":
        return None
    return reply.moderation if state.moderation_mode == "block" else state.moderator.moderate([reply.text])[0]
