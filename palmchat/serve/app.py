"""The OpenAI-compatible HTTP API (FastAPI): `create_app(state)` assembles it around a loaded model. Each
endpoint family has its file in routes/:

    health.py         GET  /health, /metrics (no key needed); GET /, /label: the chat and labelling pages
    models.py         GET  /v1/models[/{model}]: the checkpoint, plus "<id>:best-of-N" with a reward model
    chat.py           POST /v1/chat/completions: stateless chat, streamed or not; n, best_of, stop, seed, usage
    completions.py    POST /v1/completions: plain text, bos + the prompt's tokens
    responses.py      POST /v1/responses (stateful: previous_response_id / conversation, instructions, store);
                      GET|DELETE /v1/responses/{id} (+ GET .../input_items)
    conversations.py  /v1/conversations[/{id}[/items[/{item_id}]]] (+ GET /v1/conversations: the caller's)
    moderations.py    POST /v1/moderations
    feedback.py       /v1/feedback, /v1/conversations/{id}/compare, /v1/comparisons/{id}/ranking, /v1/label/*,
                      /v1/admin/reload (extensions: OpenAI's API has no feedback endpoints)
    admin.py          POST /v1/load_lora_adapter, /v1/unload_lora_adapter (vLLM's): LoRA adapters at run time

What they share: state.py (ServerState, the caller's key and rate limit), errors.py (OpenAI-shaped errors, the
body limit), sampling.py (request -> sampling parameters and fitted prompt), generate.py (prompt -> replies,
moderation), streaming.py (server-sent events, client presence), metrics.py (Prometheus).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from palmchat.serve.errors import ASCIIJSONResponse, BodyLimit, LocalOnly, add_error_handlers
from palmchat.serve.metrics import CountRequests, metrics_registry
from palmchat.serve.routes import (
    admin,
    chat,
    completions,
    conversations,
    feedback,
    health,
    models,
    moderations,
    responses,
)
from palmchat.serve.security import SecurityHeaders
from palmchat.serve.state import ServerState
from palmchat.serve.streaming import WatchClient

SHUTDOWN_WAIT = 5.0  # seconds shutdown waits at most for cancelled requests to leave the scheduler
ROUTERS = [health, models, chat, completions, responses, conversations, moderations, feedback, admin]  # OpenAPI order


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving `state`; its lifespan starts and stops the scheduler."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.scheduler.start()
        try:
            yield
        finally:
            # the requests uvicorn cancelled at shutdown clean up first (a stream commits what it had, then its
            # generation leaves the scheduler): stopping the scheduler under them would fail them instead
            await asyncio.to_thread(state.scheduler.wait_idle, SHUTDOWN_WAIT)
            await asyncio.to_thread(state.scheduler.stop)

    app = FastAPI(title="palmchat", version="0.1.0", lifespan=lifespan, default_response_class=ASCIIJSONResponse,
                  description="An OpenAI-compatible API serving a palmchat checkpoint.")
    app.state.palmchat = state
    app.state.label_locks = {}  # task id -> asyncio.Lock while its candidates are sampled (routes/feedback.py)
    app.state.registry, counter = metrics_registry(state)
    for module in ROUTERS:
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=health.STATIC), name="static")
    add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=state.max_request_bytes)
    if state.local_hosts is not None:
        app.add_middleware(LocalOnly, hosts=state.local_hosts)
    app.add_middleware(SecurityHeaders)  # every response: the pages' Content-Security-Policy, nosniff
    app.add_middleware(WatchClient)  # outside BodyLimit: it keeps the server's own receive
    app.add_middleware(CountRequests, counter=counter)  # outermost: also counts the 413s
    return app
