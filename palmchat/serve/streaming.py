"""Server-sent events: how the streamed endpoints frame their events, and a streaming response that cleans up
as soon as its client goes away."""

from __future__ import annotations

import json

import anyio
from fastapi.responses import StreamingResponse

from palmchat.serve.errors import client_error_body


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


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
    return ClosingStream(events, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


def error_event(exc: Exception) -> dict:
    """An error met mid-stream, as the data of its event (the status line has already been sent)."""
    return client_error_body(exc)
