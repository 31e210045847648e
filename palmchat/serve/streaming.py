"""Server-sent events: how the streamed endpoints frame their events, a streaming response that cleans up as soon
as its client goes away and sends keep-alive comments while it has nothing else to send, and `WatchClient`, the
middleware through which a non-streamed request learns that its client went away (client_disconnected)."""

from __future__ import annotations

import asyncio
import contextvars
import json

import anyio
from fastapi.responses import StreamingResponse

from palmchat.serve.errors import client_error_body

# seconds of silence after which a stream sends a comment line: proxies cut connections idle for 60-100 s, and
# a stream is silent while its request waits in the queue or while best-of-n ranks its candidates
KEEP_ALIVE_SECONDS = 15.0
KEEP_ALIVE = ": keep-alive\n\n"

_receive: contextvars.ContextVar = contextvars.ContextVar("palmchat_receive", default=None)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def with_keep_alive(events, every: float | None = None):
    """The events of `events`, with a KEEP_ALIVE comment after each `every` seconds (default KEEP_ALIVE_SECONDS)
    without one. Closing this closes `events` (its cleanup runs, a cancellation reaches it as one)."""
    every = KEEP_ALIVE_SECONDS if every is None else every
    pending = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield KEEP_ALIVE
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield event
    finally:
        if pending is not None:  # the client went away or the server is stopping while `events` was waiting
            pending.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({pending})
        with anyio.CancelScope(shield=True):
            await events.aclose()


class ClosingStream(StreamingResponse):
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
    return ClosingStream(with_keep_alive(events), media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


def error_event(exc: Exception) -> dict:
    """An error met mid-stream, as the data of its event (the status line has already been sent)."""
    return client_error_body(exc)


class WatchClient:
    """ASGI middleware: keeps the server's `receive` of the request being handled, for client_disconnected. It
    must sit outside any middleware that replays the body (BodyLimit), whose receive would hand the body over
    again."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = _receive.set(receive)
        try:
            await self.app(scope, receive, send)
        finally:
            _receive.reset(token)


async def client_disconnected() -> bool:
    """Whether the client of the request being handled has gone away (False outside a request, or before its
    body was read: only then is a message other than the disconnect possible). Does not wait."""
    receive = _receive.get()
    if receive is None:
        return False
    message = {}
    with anyio.CancelScope() as scope:  # as Starlette's Request.is_disconnected: poll, never wait
        scope.cancel()
        message = await receive()
    return message.get("type") == "http.disconnect"
