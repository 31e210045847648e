"""The routes open without a key: /health, /metrics (Prometheus), and the chat and labelling pages
(the static files they load are mounted at /static by create_app)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse

from palmchat.serve.state import server_state

STATIC = Path(__file__).parent.parent / "static"
router = APIRouter()


@router.get("/health")
async def health(request: Request):
    state = server_state(request)
    return {"status": "ok", "model": state.model_id, "reward_model": state.reward_model_path or None,
            "limits": {"max_request_bytes": state.max_request_bytes, "max_output_tokens": state.max_tokens_limit,
                       "context_tokens": state.context},
            # false: the chat template rewrites earlier turns, so every turn renders the conversation again
            "prefix_stable": state.tokenizer.chat_format.prefix_stable,
            **state.scheduler.stats()}


@router.get("/", include_in_schema=False)
async def chat_page():
    return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})


@router.get("/label", include_in_schema=False)
async def label_page():
    return FileResponse(STATIC / "label.html", headers={"cache-control": "no-cache"})


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return PlainTextResponse(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
