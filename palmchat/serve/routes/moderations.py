"""POST /v1/moderations: the server's moderator on one or more texts, in OpenAI's shape."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from palmchat.serve import schemas as S
from palmchat.serve.errors import APIError
from palmchat.serve.generate import MODERATION_MODEL
from palmchat.serve.state import caller, server_state

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])


@router.post("/moderations")
async def moderations(body: S.ModerationRequest, request: Request):
    state = server_state(request)
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
