"""The OpenAI-compatible HTTP API (FastAPI): `create_app(state)` builds it around a loaded model.

    GET  /v1/models                     the checkpoint, plus "<id>:best-of-N" when a reward model is loaded
    POST /v1/chat/completions           stateless chat, streamed or not; n, best_of, stop, seed, usage
    POST /v1/completions                plain text: bos + the prompt's tokens
    POST /v1/responses                  stateful: previous_response_id / conversation, instructions, store
    GET|DELETE /v1/responses/{id}       (+ GET .../input_items)
    /v1/conversations[/{id}[/items[/{item_id}]]]   (+ GET /v1/conversations: the caller's, an extension)
    POST /v1/moderations
    GET  /health, /metrics              (no key needed)
    GET  /, /label, /static/...         the chat and labelling pages (static files, no key needed to load them)
    feedback.py: /v1/feedback, /v1/conversations/{id}/compare, /v1/comparisons/{id}/ranking, /v1/label/*,
                 /v1/admin/reload       (extensions: OpenAI's API has no feedback endpoints)

How a stateful turn is built (see store.py): the conversation so far is a list of token ids, only ever
appended to. A follow-up's prompt is `history + new turns + <|assistant|>`, so it starts with the very tokens
of the previous prompt and reply, whose K/V the scheduler's prefix cache holds: only the new turn is computed,
and `usage.input_tokens_details.cached_tokens` says how many were not.

`instructions` apply to one response only, as in OpenAI's API: they are rendered as a system turn at the front
of that response's prompt, `[bos, system(instructions)] + history[1:] + new turns`, and are not stored. The
cache consequence: a turn with instructions shares only `bos` with a prompt built without them (and vice
versa), so switching instructions on or off costs one full prefill; a client that sends the same instructions
every turn (the usual pattern) still hits the cache, since each such prompt extends the one before.

Concurrent responses in one conversation are not serialised: each sees the items committed when it started,
and their items are appended in the order they finish.

A turn is committed to the database before its reply completes (before the final SSE event, or before the
non-streamed response is sent), so a client that saw a response finish can always continue from it, even
after the server was killed.

A streamed reply whose client goes away (the page's Stop button aborts the request) is committed as it stood:
the input and the text released so far, as an assistant item with status `incomplete`, in a stored response
with status `cancelled`; the conversation continues from those tokens. A killed server commits nothing of the
turn it was generating.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from palmchat.inference.engine import SamplingParams
from palmchat.serve import schemas as S
from palmchat.serve.generate import Generation, GenerationError, rank_best_of
from palmchat.serve.keys import RateLimiter, hash_secret, parse_rate, retry_after_header
from palmchat.serve.schemas import APIError
from palmchat.serve.truncation import Fitted, drop_oldest_messages

REFUSAL = "I can't help with that request."
MODERATION_MODEL = "palmchat-moderation"
STATIC = Path(__file__).parent / "static"


@dataclass
class ServerState:
    """Everything the endpoints use; built by run.py (or a test) and handed to create_app."""

    model_id: str
    tokenizer: object  # palmchat.tokenizer.Tokenizer
    scheduler: object  # palmchat.inference.scheduler.Scheduler (started by the app's lifespan)
    store: object  # palmchat.serve.store.Store
    reward_model: object | None = None
    reward_model_path: str = ""  # what /v1/admin/reload swapped in last, for /health
    moderator: object | None = None
    moderation_mode: str = "warn"  # off | warn | block
    max_tokens_limit: int = 4096
    max_request_bytes: int = 1 << 20
    rate_limit: str = "0"  # default per-key request rate, e.g. "60/min"; 0 = none
    require_key: bool = False  # refuse requests without a key even when the database holds none
    limiter: RateLimiter = field(default_factory=RateLimiter)

    @property
    def context(self) -> int:
        return self.scheduler.config.max_seq_len


def _state(request: Request) -> ServerState:
    return request.app.state.palmchat


# =============================================================================================
# Errors, body limit, request counting
# =============================================================================================


class ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate a client sent (valid JSON, invalid UTF-8) can then be echoed
    in an error message without failing to encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _error_response(status: int, body: dict, headers: dict | None = None) -> ASCIIJSONResponse:
    return ASCIIJSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: Request, exc: APIError):
    return _error_response(exc.status, exc.body(), exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError):
    error = exc.errors()[0]
    loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
    if error.get("type") == "json_invalid":
        message = ("We could not parse the JSON body of your request: "
                   f"{(error.get('ctx') or {}).get('error', 'invalid JSON')}. The body must be a JSON object.")
        return _error_response(400, S.error_body(message, code="invalid_json"))
    where = ".".join(loc)
    message = f"{where}: {error.get('msg')}" if where else str(error.get("msg"))
    if len(exc.errors()) > 1:
        message += f" (and {len(exc.errors()) - 1} more problems)"
    return _error_response(400, S.error_body(message, param=where or None, code=str(error.get("type"))))


async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return _error_response(exc.status_code, S.error_body(message, code=None), getattr(exc, "headers", None))


async def _server_error(request: Request, exc: Exception):
    return _error_response(500, S.error_body(f"The server had an error ({type(exc).__name__}); the request was not "
                                             f"completed", type="server_error"))


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes gets 413 before anything reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._reject(send, declared.isdigit())
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._reject(send, True)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send, too_large: bool):
        status, message = (413, f"The request body is larger than this server's limit of {self.limit} bytes") \
            if too_large else (400, "Invalid Content-Length header")
        body = json.dumps(S.error_body(message, code="request_too_large" if too_large else None)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class CountRequests:
    """ASGI middleware: palmchat_http_requests_total{route, status}."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.counter.labels(route=route, status=str(status[0])).inc()


# =============================================================================================
# Auth, models, sampling parameters
# =============================================================================================


async def caller(request: Request) -> str:
    """The owner of what this request creates or reads: an API key's id, or '' on a server without keys.
    Also takes one request from that key's rate-limit bucket."""
    state = _state(request)
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    keys_in_use = state.require_key or state.store.active_key_count() > 0
    owner, rate = "", state.rate_limit
    if keys_in_use:
        key = state.store.key_by_hash(hash_secret(secret.strip())) if scheme.lower() == "bearer" and secret else None
        if key is None:
            message = ("Incorrect API key provided." if secret else
                       "You didn't provide an API key. Send it in an 'Authorization: Bearer KEY' header.")
            raise APIError(401, message, code="invalid_api_key",
                           headers={"www-authenticate": "Bearer"})
        owner, rate = key["id"], key["rate_limit"] or state.rate_limit
    wait = state.limiter.take(owner or "anonymous", parse_rate(rate))
    if wait:
        raise APIError(429, f"Rate limit reached ({rate}). Please try again in {wait:.1f}s.", type="requests",
                       code="rate_limit_exceeded", headers={"retry-after": retry_after_header(wait)})
    return owner


def model_candidates(state: ServerState, model: str) -> int | None:
    """Check `model` names this server's model; returns N of a ':best-of-N' suffix."""
    base, _, suffix = model.partition(":")
    if base != state.model_id:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{state.model_id}'",
                       param="model", code="model_not_found")
    if not suffix:
        return None
    m = re.fullmatch(r"best-of-(\d{1,3})", suffix)
    if not m or not 1 <= int(m.group(1)) <= S.MAX_CHOICES:
        raise APIError(400, f"model '{model}': the only suffix is ':best-of-N' with N from 1 to {S.MAX_CHOICES}",
                       param="model")
    if state.reward_model is None:
        raise APIError(400, f"model '{model}': best-of-n needs a reward model; start the server with --reward-model",
                       param="model")
    return int(m.group(1))


def sampling(state: ServerState, body, prompt_len: int, max_tokens: int | None, param: str, input_param: str,
             default_max: int | None = None) -> SamplingParams:
    limit, ctx = state.max_tokens_limit, state.context
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"{param} is {max_tokens}, more than this server's limit of {limit}", param=param,
                       code="integer_above_max_value")
    room = ctx - prompt_len
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens, and the input has {prompt_len} "
                            f"tokens: no room is left for a reply", param=input_param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the input, {max_tokens} in {param})",
                       param=param, code="context_length_exceeded")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else max(body.top_p, 1e-6)  # 0 keeps the single most likely token
    seed = body.seed if "seed" in type(body).model_fields else None  # not an extra field a client made up
    return SamplingParams(max_new_tokens=max_tokens or min(room, limit, default_max or room), temperature=temperature,
                          top_p=top_p, seed=None if seed is None else seed % 2**62,
                          stop_token_ids=state.tokenizer.reply_stop_ids)


def fit_prompt(state: ServerState, prompt: list[int], max_tokens: int | None, truncation: str | None) -> Fitted:
    """The prompt as it will run. With truncation "auto" its oldest messages are left out until the reply has room
    for `max_tokens`, or when that is unset for a quarter of the context (then it may use all the room left)."""
    if truncation != "auto":
        return Fitted(prompt)
    reserve = max_tokens or min(state.max_tokens_limit, state.context // 4)
    return drop_oldest_messages(prompt, state.tokenizer, state.context - reserve, quantum=max(1, state.context // 8))


def stops_of(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def choice_counts(state: ServerState, body) -> tuple[int, int | None]:
    """(n, candidates): candidates is the best-of count (the body's best_of, else the model suffix) or None."""
    suffix = model_candidates(state, body.model)
    candidates = body.best_of or suffix
    if body.best_of and state.reward_model is None:
        raise APIError(400, "best_of needs a reward model; start the server with --reward-model", param="best_of")
    if candidates is not None and candidates < body.n:
        raise APIError(400, f"best_of ({candidates}) must be at least n ({body.n})", param="best_of")
    if candidates == 1 and body.n == 1:
        candidates = None  # best of one is a plain sample
    return body.n, candidates


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


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class _ClosingStream(StreamingResponse):
    """Closes its generator as soon as the response ends, also when the client went away mid-stream, so the
    generator's cleanup (cancel the generation, commit a stopped reply) runs now rather than at garbage
    collection."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            if hasattr(self.body_iterator, "aclose"):
                with anyio.CancelScope(shield=True):
                    await self.body_iterator.aclose()


def stream_response(events) -> StreamingResponse:
    return _ClosingStream(events, media_type="text/event-stream",
                          headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


def error_event(exc: Exception) -> dict:
    if isinstance(exc, APIError):
        return exc.body()
    return S.error_body(str(exc), type="server_error")


async def generate_replies(state: ServerState, prompt: list[int], params: SamplingParams, n: int,
                           candidates: int | None, stops: list[str]) -> tuple[Generation, list]:
    """Non-streamed: the n replies (the reward model's n best of `candidates` when set)."""
    block = state.moderation_mode == "block"
    try:
        if candidates:
            generation, order = await rank_best_of(state, prompt, params, n, candidates, stops, block)
            return generation, [generation.replies[j] for j in order]
        generation = Generation(state, prompt, params, n, stops, block)
        return generation, await generation.run()
    except GenerationError as e:
        raise APIError(e.status, str(e), type="server_error") from None


# =============================================================================================
# Endpoints
# =============================================================================================

v1 = APIRouter(prefix="/v1", dependencies=[Depends(caller)])
open_routes = APIRouter()


@open_routes.get("/health")
async def health(request: Request):
    state = _state(request)
    return {"status": "ok", "model": state.model_id, "reward_model": state.reward_model_path or None,
            "limits": {"max_request_bytes": state.max_request_bytes, "max_output_tokens": state.max_tokens_limit,
                       "context_tokens": state.context},
            **state.scheduler.stats()}


@open_routes.get("/", include_in_schema=False)
async def chat_page():
    return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})


@open_routes.get("/label", include_in_schema=False)
async def label_page():
    return FileResponse(STATIC / "label.html", headers={"cache-control": "no-cache"})


@open_routes.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return PlainTextResponse(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@v1.get("/models")
async def list_models(request: Request):
    state = _state(request)
    ids = [state.model_id] + ([f"{state.model_id}:best-of-{n}" for n in (4, 8)] if state.reward_model else [])
    return {"object": "list", "data": [model_card(state, i) for i in ids]}


@v1.get("/models/{model}")
async def get_model(model: str, request: Request):
    model_candidates(_state(request), model)
    return model_card(_state(request), model)


def model_card(state: ServerState, model: str) -> dict:
    """OpenAI's model object plus its context length under vLLM's name for it."""
    return {"id": model, "object": "model", "created": 0, "owned_by": "palmchat", "max_model_len": state.context}


# -- chat completions ----------------------------------------------------------------------------------


@v1.post("/chat/completions")
async def chat_completions(body: S.ChatCompletionRequest, request: Request):
    state = _state(request)
    n, candidates = choice_counts(state, body)
    messages = [{"role": S.role_of(m.role), "content": S.text_of(m.content)} for m in body.messages]
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens or body.max_tokens
    fitted = fit_prompt(state, state.tokenizer.render_prompt(messages), max_tokens, body.truncation)
    prompt = fitted.prompt
    params = sampling(state, body, len(prompt), max_tokens, param, "messages")
    stops = stops_of(body.stop)
    flagged_in = await moderate_input(state, [m["content"] for m in messages if m["role"] != "assistant"])
    id, created = S.new_id("chatcmpl-"), int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def extra(outputs=()) -> dict:
        """`moderation` as on OpenAI's chat completions (the input's verdict and one per choice), and what
        truncation left out."""
        more = {"truncation_details": fitted.details()} if fitted.details() else {}
        if flagged_in is None:
            return more
        return {**more, "moderation": {"input": moderation_results([flagged_in]),
                                       "output": moderation_results([o for o in outputs if o is not None])}}

    if flagged_in is not None and flagged_in.flagged and state.moderation_mode == "block":
        choices = [S.chat_choice(i, None, "content_filter", refusal=REFUSAL) for i in range(n)]
        usage = S.chat_usage(len(prompt), 0, 0)
        if not body.stream:
            return S.chat_completion(id, body.model, created, choices, usage, **extra())

        async def refused():
            yield sse(S.chat_chunk(id, body.model, created, [
                {"index": i, "delta": {"role": "assistant", "content": None, "refusal": REFUSAL},
                 "finish_reason": "content_filter", "logprobs": None} for i in range(n)], **extra()))
            if include_usage:
                yield sse(S.chat_chunk(id, body.model, created, [], usage))
            yield "data: [DONE]\n\n"

        return stream_response(refused())

    if not body.stream:
        generation, replies = await generate_replies(state, prompt, params, n, candidates, stops)
        choices = [S.chat_choice(i, r.text, r.finish_reason) for i, r in enumerate(replies)]
        usage = S.chat_usage(len(prompt), generation.completion_tokens, generation.cached_tokens)
        return S.chat_completion(id, body.model, created, choices, usage,
                                 **extra([moderate_output(state, r) for r in replies]))

    generation = None if candidates else Generation(state, prompt, params, n, stops, state.moderation_mode == "block")

    async def events():
        def chunk(index, delta, finish=None, **more):
            return sse(S.chat_chunk(id, body.model, created, [{"index": index, "delta": delta,
                                                                "finish_reason": finish, "logprobs": None}], **more))

        nonlocal generation
        try:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            finishes = []  # (index, finish_reason) in the order the replies ended
            if generation is None:  # best-of: nothing to stream before the reward model chose
                generation, replies = await generate_replies(state, prompt, params, n, candidates, stops)
                for i, r in enumerate(replies):
                    yield chunk(i, {"content": r.text})
                    finishes.append((i, r.finish_reason))
                    if i < n - 1:
                        yield chunk(i, {}, r.finish_reason)
            else:
                replies = generation.replies
                async for i, delta, finish in generation.deltas():
                    if delta:
                        yield chunk(i, {"content": delta})
                    if finish:
                        finishes.append((i, finish))
                        if len(finishes) < n:
                            yield chunk(i, {}, finish)
            # the last reply's finish carries the moderation verdicts, known only now
            last, finish = finishes[-1]
            yield chunk(last, {}, finish, **extra([moderate_output(state, r) for r in replies]))
        except (APIError, GenerationError) as e:
            yield sse(error_event(e))
            return
        finally:  # also when the client went away before the replies were read
            if generation is not None:
                generation.cancel()
        if include_usage:
            usage = S.chat_usage(len(prompt), generation.completion_tokens, generation.cached_tokens)
            yield sse(S.chat_chunk(id, body.model, created, [], usage))
        yield "data: [DONE]\n\n"

    return stream_response(events())


# -- completions (plain text) --------------------------------------------------------------------------


@v1.post("/completions")
async def completions(body: S.CompletionRequest, request: Request):
    state = _state(request)
    n, candidates = choice_counts(state, body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise APIError(400, "this server takes one prompt per request", param="prompt")
    text = S.clean_text(prompts[0])
    prompt = [state.tokenizer.bos_id] + state.tokenizer.encode(text)
    params = sampling(state, body, len(prompt), body.max_tokens, "max_tokens", "prompt", default_max=16)
    stops = stops_of(body.stop)
    flagged_in = await moderate_input(state, [text])
    id, created = S.new_id("cmpl-"), int(time.time())
    if flagged_in is not None and flagged_in.flagged and state.moderation_mode == "block":
        choices = [{"index": i, "text": "", "finish_reason": "content_filter", "logprobs": None} for i in range(n)]
        result = S.text_completion(id, body.model, created, choices, S.chat_usage(len(prompt), 0, 0))
        if not body.stream:
            return result

        async def refused():
            yield sse(result)
            yield "data: [DONE]\n\n"

        return stream_response(refused())

    if not body.stream:
        generation, replies = await generate_replies(state, prompt, params, n, candidates, stops)
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                   for i, r in enumerate(replies)]
        usage = S.chat_usage(len(prompt), generation.completion_tokens, generation.cached_tokens)
        return S.text_completion(id, body.model, created, choices, usage)

    generation = None if candidates else Generation(state, prompt, params, n, stops, state.moderation_mode == "block")

    async def events():
        nonlocal generation

        def chunk(index, text, finish=None):
            return sse(S.text_completion(id, body.model, created, [
                {"index": index, "text": text, "finish_reason": finish, "logprobs": None}], None))

        try:
            if generation is None:
                generation, replies = await generate_replies(state, prompt, params, n, candidates, stops)
                for i, r in enumerate(replies):
                    yield chunk(i, r.text, r.finish_reason)
            else:
                async for i, delta, finish in generation.deltas():
                    yield chunk(i, delta, finish)
        except (APIError, GenerationError) as e:
            yield sse(error_event(e))
            return
        finally:
            if generation is not None:
                generation.cancel()
        if body.stream_options and body.stream_options.include_usage:
            usage = S.chat_usage(len(prompt), generation.completion_tokens, generation.cached_tokens)
            yield sse(S.text_completion(id, body.model, created, [], usage))
        yield "data: [DONE]\n\n"

    return stream_response(events())


# -- responses (stateful) ------------------------------------------------------------------------------


@dataclass
class Turn:
    """One /v1/responses call, prepared: where its history comes from, what it adds, and its prompt."""

    history: list[int]  # the stored context it continues (starts with bos)
    texts: list[tuple[str, str]]  # (role, text) of each input message
    turn_tokens: list[list[int]]  # each input message rendered
    input_items: list[dict]
    prompt: list[int]  # what runs: the context, or with truncation "auto" what is left of it
    conversation_id: str | None
    truncation_details: dict | None = None

    @property
    def context(self) -> list[int]:
        """The context without instructions, up to and including the <|assistant|> that opens the reply."""
        return self.history + [t for turn in self.turn_tokens for t in turn] + [self.prompt[-1]]


def prepare_turn(state: ServerState, owner: str, body: S.ResponseRequest) -> Turn:
    tok = state.tokenizer
    if body.previous_response_id and body.conversation:
        raise APIError(400, "previous_response_id and conversation cannot be used together", param="conversation")
    conversation_id = None
    if body.previous_response_id:
        previous = state.store.get_response(owner, body.previous_response_id)
        if previous is None:
            raise APIError(404, f"Previous response with id '{body.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        history = previous["context"]
    elif body.conversation:
        conversation_id = body.conversation if isinstance(body.conversation, str) else body.conversation.id
        if state.store.get_conversation(owner, conversation_id) is None:
            raise APIError(404, f"Conversation with id '{conversation_id}' not found.", param="conversation",
                           code="not_found")
        history = [tok.bos_id] + state.store.context(conversation_id)
    else:
        history = [tok.bos_id]
    messages = [S.InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    if not messages:
        raise APIError(400, "input must hold at least one message", param="input")
    texts = [(m.role, S.text_of(m.content)) for m in messages]
    turn_tokens = [tok.render_turn({"role": S.role_of(role), "content": text}) for role, text in texts]
    input_items = [S.message_item(S.new_id("msg_"), role, text) for role, text in texts]
    prompt = history + [t for turn in turn_tokens for t in turn] + [tok.assistant_id]
    if body.instructions:
        prompt = [tok.bos_id] + tok.render_turn({"role": "system", "content": S.clean_text(body.instructions)}) + prompt[1:]
    fitted = fit_prompt(state, prompt, body.max_output_tokens, body.truncation)
    return Turn(history, texts, turn_tokens, input_items, fitted.prompt, conversation_id, fitted.details())


@v1.post("/responses")
async def create_response(body: S.ResponseRequest, request: Request, owner: str = Depends(caller)):
    state = _state(request)
    candidates = model_candidates(state, body.model)
    turn = prepare_turn(state, owner, body)
    params = sampling(state, body, len(turn.prompt), body.max_output_tokens, "max_output_tokens", "input")
    flagged_in = await moderate_input(state, [text for role, text in turn.texts if role != "assistant"]
                                      + [S.clean_text(body.instructions or "")])
    blocked = flagged_in is not None and flagged_in.flagged and state.moderation_mode == "block"
    response_id, item_id, created_at = S.new_id("resp_"), S.new_id("msg_"), time.time()
    block_output = state.moderation_mode == "block"

    def response(status: str, output: list[dict], usage: dict | None, reason: str | None = None,
                 output_moderation=None) -> dict:
        moderation = None
        if flagged_in is not None or output_moderation is not None:
            moderation = {"input": moderation_result(flagged_in) if flagged_in else None,
                          "output": moderation_result(output_moderation) if output_moderation else None}
        return S.response_object(response_id, body.model, created_at, status, output,
                                 instructions=body.instructions, previous_response_id=body.previous_response_id,
                                 conversation_id=turn.conversation_id, max_output_tokens=body.max_output_tokens,
                                 temperature=body.temperature, top_p=body.top_p, metadata=body.metadata,
                                 store=body.store, usage=usage, incomplete_reason=reason, moderation=moderation,
                                 truncation=body.truncation or "disabled",
                                 truncation_details=turn.truncation_details)

    async def commit(final: dict, reply_tokens: list[int] | None) -> None:
        """Store the turn. A blocked input never enters the token history: its items are kept with no tokens."""
        if reply_tokens is None:
            context, items = turn.history, [(item, []) for item in turn.input_items + final["output"]]
        else:
            context = turn.context + reply_tokens
            items = list(zip(turn.input_items, turn.turn_tokens)) + [(final["output"][0], [turn.prompt[-1]] + reply_tokens)]
        try:
            await asyncio.to_thread(state.store.commit_turn, owner, final if body.store else None, turn.input_items,
                                    context, turn.conversation_id, items)
        except KeyError:
            raise APIError(404, f"Conversation with id '{turn.conversation_id}' was deleted during this response.",
                           param="conversation") from None

    def finished(reply, output_moderation) -> dict:
        status, reason = {"stop": ("completed", None), "length": ("incomplete", "max_output_tokens"),
                          "content_filter": ("incomplete", "content_filter")}[reply.finish_reason]
        item = S.message_item(item_id, "assistant", reply.text, status="completed" if status == "completed" else "incomplete")
        usage = S.response_usage(len(turn.prompt), generation.completion_tokens, generation.cached_tokens)
        return response(status, [item], usage, reason, output_moderation)

    if blocked:
        final = response("incomplete", [S.message_item(item_id, "assistant", "", refusal=REFUSAL)],
                         S.response_usage(len(turn.prompt), 0, 0), "content_filter")
    generation = None
    if not body.stream:
        if blocked:
            await commit(final, None)
            return final
        generation, replies = await generate_replies(state, turn.prompt, params, 1, candidates, [])
        final = finished(replies[0], moderate_output(state, replies[0]))
        await commit(final, replies[0].context_tokens())
        return final

    if not blocked and not candidates:
        generation = Generation(state, turn.prompt, params, 1, [], block_output)
    settled = False  # committed, or failed: a disconnect from then on stores nothing

    def commit_stopped() -> None:
        """The client went away mid-reply: keep what was released so far (synchronously: this runs while the
        request is being torn down, where nothing may be awaited)."""
        if settled or generation is None or candidates:
            return
        reply = generation.replies[0]
        item = S.message_item(item_id, "assistant", reply.text, status="incomplete")
        final = response("cancelled", [item], S.response_usage(len(turn.prompt), generation.completion_tokens,
                                                                generation.cached_tokens))
        items = list(zip(turn.input_items, turn.turn_tokens)) + [(item, [turn.prompt[-1]] + reply.context_tokens())]
        try:
            state.store.commit_turn(owner, final if body.store else None, turn.input_items,
                                    turn.context + reply.context_tokens(), turn.conversation_id, items)
        except KeyError:  # the conversation was deleted meanwhile: nothing to continue
            pass

    async def events():
        nonlocal generation, settled
        sequence = iter(range(1 << 62))

        def event(type: str, **data) -> str:
            return f"event: {type}\n" + sse({"type": type, "sequence_number": next(sequence), **data})

        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        started = response("in_progress", [], None)
        try:
            yield event("response.created", response=started)
            yield event("response.in_progress", response=started)
            if blocked:
                item = final["output"][0]
                yield event("response.output_item.added", output_index=0, item={**item, "status": "in_progress", "content": []})
                yield event("response.content_part.added", **where, part={"type": "refusal", "refusal": ""})
                yield event("response.refusal.delta", **where, delta=REFUSAL)
                yield event("response.refusal.done", **where, refusal=REFUSAL)
                yield event("response.content_part.done", **where, part=item["content"][0])
                yield event("response.output_item.done", output_index=0, item=item)
                await commit(final, None)
                yield event("response.incomplete", response=final)
                return
            yield event("response.output_item.added", output_index=0,
                        item={"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []})
            yield event("response.content_part.added", **where,
                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            if generation is None:
                generation, replies = await generate_replies(state, turn.prompt, params, 1, candidates, [])
                reply = replies[0]
                if reply.text:
                    yield event("response.output_text.delta", **where, delta=reply.text, logprobs=[])
            else:
                async for _, delta, _ in generation.deltas():
                    if delta:
                        yield event("response.output_text.delta", **where, delta=delta, logprobs=[])
                reply = generation.replies[0]
            result = finished(reply, moderate_output(state, reply))
            item = result["output"][0]
            yield event("response.output_text.done", **where, text=reply.text, logprobs=[])
            yield event("response.content_part.done", **where, part=item["content"][0])
            yield event("response.output_item.done", output_index=0, item=item)
            settled = True
            await commit(result, reply.context_tokens())
            yield event(f"response.{result['status']}", response=result)
        except (APIError, GenerationError) as e:
            settled = True
            error = error_event(e)["error"]
            yield event("error", code=error["code"], message=error["message"], param=error["param"])
        except (asyncio.CancelledError, GeneratorExit):
            commit_stopped()
            raise
        finally:
            if generation is not None:
                generation.cancel()

    return stream_response(events())


def _stored_response(state: ServerState, owner: str, response_id: str) -> dict:
    stored = state.store.get_response(owner, response_id)
    if stored is None:
        raise S.not_found("Response", response_id)
    return stored


@v1.get("/responses/{response_id}")
async def get_response(response_id: str, request: Request, owner: str = Depends(caller)):
    return _stored_response(_state(request), owner, response_id)["body"]


@v1.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request, owner: str = Depends(caller)):
    if not await asyncio.to_thread(_state(request).store.delete_response, owner, response_id):
        raise S.not_found("Response", response_id)
    return {"id": response_id, "object": "response", "deleted": True}


def _page(items: list[dict], limit: int, order: str, after: str | None) -> dict:
    items = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise APIError(400, f"after: no item with id '{after}'", param="after")
        items = items[ids.index(after) + 1:]
    return S.item_list(items[:limit], has_more=len(items) > limit)


@v1.get("/responses/{response_id}/input_items")
async def response_input_items(response_id: str, request: Request, owner: str = Depends(caller),
                               limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc",
                               after: str | None = None):
    return _page(_stored_response(_state(request), owner, response_id)["input_items"], limit, order, after)


# -- conversations -------------------------------------------------------------------------------------


def _conversation(state: ServerState, owner: str, conversation_id: str) -> dict:
    conversation = state.store.get_conversation(owner, conversation_id)
    if conversation is None:
        raise S.not_found("Conversation", conversation_id)
    return conversation


def _items(state: ServerState, messages: list[S.InputMessage]) -> list[tuple[dict, list[int]]]:
    out = []
    for m in messages:
        text = S.text_of(m.content)
        out.append((S.message_item(S.new_id("msg_"), m.role, text),
                    state.tokenizer.render_turn({"role": S.role_of(m.role), "content": text})))
    return out


@v1.post("/conversations")
async def create_conversation(request: Request, body: S.ConversationCreateRequest | None = None,
                              owner: str = Depends(caller)):
    state = _state(request)
    body = body or S.ConversationCreateRequest()
    conversation = {"id": S.new_id("conv_"), "object": "conversation", "created_at": int(time.time()),
                    "metadata": body.metadata or {}}
    await asyncio.to_thread(state.store.create_conversation, owner, conversation, _items(state, body.items or []))
    return conversation


@v1.get("/conversations")
async def list_conversations(request: Request, owner: str = Depends(caller), limit: int = Query(20, ge=1, le=100),
                             order: Literal["asc", "desc"] = "desc", after: str | None = None):
    """An extension (OpenAI's API cannot list conversations): the caller's conversations, newest first by default.
    The chat page keeps each one's title in `metadata.title`."""
    return _page(_state(request).store.list_conversations(owner), limit, order, after)


@v1.get("/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, request: Request, owner: str = Depends(caller)):
    return _conversation(_state(request), owner, conversation_id)


@v1.post("/conversations/{conversation_id}")
async def update_conversation(conversation_id: str, body: S.ConversationUpdateRequest, request: Request,
                              owner: str = Depends(caller)):
    state = _state(request)
    if not await asyncio.to_thread(state.store.update_conversation, owner, conversation_id, body.metadata):
        raise S.not_found("Conversation", conversation_id)
    return _conversation(state, owner, conversation_id)


@v1.delete("/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request, owner: str = Depends(caller)):
    if not await asyncio.to_thread(_state(request).store.delete_conversation, owner, conversation_id):
        raise S.not_found("Conversation", conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@v1.get("/conversations/{conversation_id}/items")
async def list_items(conversation_id: str, request: Request, owner: str = Depends(caller),
                     limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc",
                     after: str | None = None):
    state = _state(request)
    _conversation(state, owner, conversation_id)
    return _page(state.store.items(conversation_id), limit, order, after)


@v1.post("/conversations/{conversation_id}/items")
async def add_items(conversation_id: str, body: S.ItemsCreateRequest, request: Request, owner: str = Depends(caller)):
    state = _state(request)
    _conversation(state, owner, conversation_id)
    items = _items(state, body.items)
    try:
        await asyncio.to_thread(state.store.add_items, owner, conversation_id, items)
    except KeyError:
        raise S.not_found("Conversation", conversation_id) from None
    return S.item_list([item for item, _ in items])


@v1.get("/conversations/{conversation_id}/items/{item_id}")
async def get_item(conversation_id: str, item_id: str, request: Request, owner: str = Depends(caller)):
    state = _state(request)
    _conversation(state, owner, conversation_id)
    item = state.store.get_item(conversation_id, item_id)
    if item is None:
        raise S.not_found("Item", item_id)
    return item


@v1.delete("/conversations/{conversation_id}/items/{item_id}")
async def delete_item(conversation_id: str, item_id: str, request: Request, owner: str = Depends(caller)):
    state = _state(request)
    conversation = _conversation(state, owner, conversation_id)
    if not await asyncio.to_thread(state.store.delete_item, conversation_id, item_id):
        raise S.not_found("Item", item_id)
    return conversation


# -- moderations ---------------------------------------------------------------------------------------


@v1.post("/moderations")
async def moderations(body: S.ModerationRequest, request: Request):
    state = _state(request)
    if state.moderator is None:
        raise APIError(400, "moderation is off on this server (started with --moderation none)", param="input")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise APIError(400, "input must hold at least one string", param="input")
    if len(texts) > 256:
        raise APIError(400, "input holds at most 256 strings", param="input")
    results = await asyncio.to_thread(state.moderator.moderate, [S.clean_text(t) for t in texts])
    return {"id": S.new_id("modr-"), "model": MODERATION_MODEL,
            "results": [{**r.to_openai(), "category_applied_input_types": {c: ["text"] for c in r.categories}}
                        for r in results]}


# =============================================================================================
# The app
# =============================================================================================


def _metrics_registry(state: ServerState):
    from prometheus_client import CollectorRegistry, Counter
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class SchedulerMetrics:
        def collect(self):
            stats = state.scheduler.stats()
            for name, help in (("requests", "generation requests submitted to the scheduler"),
                               ("prompt_tokens", "prompt tokens of those requests"),
                               ("cached_tokens", "prompt tokens whose K/V came from the prefix cache"),
                               ("generated_tokens", "tokens sampled")):
                yield CounterMetricFamily(f"palmchat_{name}", help, value=stats.get(f"{name}_total", 0))
            prompt = stats.get("prompt_tokens_total", 0)
            yield GaugeMetricFamily("palmchat_prefix_cache_hit_rate", "cached / prompt tokens since start",
                                    value=stats.get("cached_tokens_total", 0) / prompt if prompt else 0.0)
            for name, key, help in (("batch_size", "running", "requests decoding in the batch now"),
                                    ("queue_length", "waiting", "requests waiting to join the batch"),
                                    ("prefix_cache_tokens", "prefix_cache_tokens", "tokens held by the prefix cache"),
                                    ("prefix_cache_entries", "prefix_cache_entries", "sequences in the prefix cache")):
                yield GaugeMetricFamily(f"palmchat_{name}", help, value=stats.get(key, 0))

    registry = CollectorRegistry()
    registry.register(SchedulerMetrics())
    counter = Counter("palmchat_http_requests", "HTTP requests by route and status", ["route", "status"],
                      registry=registry)
    return registry, counter


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving `state`; its lifespan starts and stops the scheduler."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.scheduler.stop)

    app = FastAPI(title="palmchat", version="0.1.0", lifespan=lifespan, default_response_class=ASCIIJSONResponse,
                  description="An OpenAI-compatible API serving a palmchat checkpoint.")
    app.state.palmchat = state
    app.state.label_locks = {}  # task id -> asyncio.Lock while its candidates are sampled (feedback.py)
    app.state.registry, counter = _metrics_registry(state)
    from fastapi.staticfiles import StaticFiles

    from palmchat.serve.feedback import router as feedback_routes

    app.include_router(open_routes)
    app.include_router(v1)
    app.include_router(feedback_routes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_middleware(BodyLimit, limit=state.max_request_bytes)
    app.add_middleware(CountRequests, counter=counter)  # outermost: also counts the 413s
    return app
