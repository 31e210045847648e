"""The routes open without a key: /health (readiness) and /health/live (liveness), /metrics (Prometheus), and
the chat and labelling pages (the static files they load are mounted at /static by create_app).

/health answers 200 when the server can take work: the scheduler's loop is making progress (its heartbeat is
recent, or it has nothing to do), the database takes a write lock, and the server is not draining (SIGTERM);
otherwise 503 with the reason in `status`. /health/live answers 503 only when the scheduler's loop is stuck or
dead, which a restart fixes; a draining server is alive but not ready. Neither shows a file path: the reward
model is named by its folder's name and the sha256 of its weights.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from palmchat.serve.state import ServerState, server_state

STATIC = Path(__file__).parent.parent / "static"
DB_CHECK_TIMEOUT = 2.0  # seconds the database's write lock may take to get before it counts as not writable
router = APIRouter()
_identities: dict[tuple, dict] = {}  # (weight files, sizes, mtimes) -> {"name", "sha256"}


def model_identity(path: str) -> dict:
    """{"name": the checkpoint's run folder name, "sha256": of its *.safetensors files, in name order}; sha256
    None when the folder can no longer be read (the model in memory is still served)."""
    from palmchat.checkpoint import resolve

    try:
        folder = resolve(path)
        files = sorted(folder.glob("*.safetensors"))
        key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    except Exception:  # noqa: BLE001 - a folder moved or deleted since it was loaded: /health must still answer
        return {"name": Path(path).name, "sha256": None}
    if key not in _identities:
        digest = hashlib.sha256()
        for f in files:
            with open(f, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
        name = folder.parent.name if folder.name.startswith("step-") else folder.name
        _identities[key] = {"name": name, "sha256": digest.hexdigest()}
    return _identities[key]


def database_problem(path: Path) -> str | None:
    """None when the database file takes a write lock within DB_CHECK_TIMEOUT seconds (nothing is written),
    else what went wrong. A connection of its own: it does not wait behind the store's lock."""
    try:
        db = sqlite3.connect(path, timeout=DB_CHECK_TIMEOUT, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
        finally:
            db.close()
    except sqlite3.Error as e:
        return f"not writable ({type(e).__name__}: {e})"
    return None


async def readiness(state: ServerState) -> tuple[str, dict]:
    """(status, checks): status "ok", "draining", "stalled" or "database_unavailable"."""
    scheduler = state.scheduler
    problem = await asyncio.to_thread(database_problem, state.store.path)
    checks = {"scheduler": "stalled" if scheduler.stalled else "ok", "database": problem or "ok"}
    status = ("stalled" if scheduler.stalled else "database_unavailable" if problem else
              "draining" if scheduler.draining else "ok")
    return status, checks


@router.get("/health")
async def health(request: Request):
    state = server_state(request)
    status, checks = await readiness(state)
    reward = None
    if state.reward_model is not None and state.reward_model_path:
        reward = await asyncio.to_thread(model_identity, state.reward_model_path)
    scheduler = state.scheduler
    body = {"status": status, "ready": status == "ok", "checks": checks, "model": state.model_id,
            "reward_model": reward,
            "limits": {"max_request_bytes": state.max_request_bytes, "max_output_tokens": state.max_tokens_limit,
                       "context_tokens": state.context, "max_batch": scheduler.max_batch,
                       "max_queue": scheduler.max_queue, "max_requests_per_key": scheduler.max_requests_per_owner,
                       "max_rows_per_key": scheduler.max_rows_per_owner},
            # false: the chat template rewrites earlier turns, so every turn renders the conversation again
            "prefix_stable": state.tokenizer.chat_format.prefix_stable,
            **scheduler.stats()}
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


@router.get("/health/live")
async def live(request: Request):
    stalled = server_state(request).scheduler.stalled
    return JSONResponse({"status": "stalled" if stalled else "ok"}, status_code=503 if stalled else 200)


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
