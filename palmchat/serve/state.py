"""What every endpoint shares: the ServerState built around a loaded model, the request -> state lookup,
`caller`, the dependency that authenticates a request and takes it from its key's rate limit, and
`labeller_key` / `admin_key`, which also require that key's role (keys.ROLES)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Depends, Request

from palmchat.serve.errors import APIError, not_found
from palmchat.serve.keys import ROLES, RateLimiter, hash_secret, parse_rate, retry_after_header


@dataclass
class ServerState:
    """Everything the endpoints use; built by run.py (or a test) and handed to create_app."""

    model_id: str
    tokenizer: object  # palmchat.tokenizer.Tokenizer
    scheduler: object  # palmchat.inference.scheduler.Scheduler (started by the app's lifespan)
    store: object  # palmchat.store.Store
    reward_model: object | None = None
    reward_model_path: str = ""  # what /v1/admin/reload swapped in last, for /health
    moderator: object | None = None
    moderation_mode: str = "warn"  # off | warn | block
    max_tokens_limit: int = 4096
    max_request_bytes: int = 1 << 20
    rate_limit: str = "0"  # default per-key request rate, e.g. "60/min"; 0 = none
    # no keys: every caller is the one person on this machine and may do everything (`palmchat serve --no-auth`,
    # loopback only); otherwise every request needs an active key of the database
    no_auth: bool = False
    # a server on loopback answers only requests addressed to these host names and from pages of the same (a web
    # page elsewhere reaching it by DNS rebinding or cross-site requests is refused); None: no check
    local_hosts: frozenset[str] | None = None
    limiter: RateLimiter = field(default_factory=RateLimiter)
    # model tokens per key (prompt + the most a reply may take, times the samples), e.g. "200000/min"; 0 = none
    token_rate_limit: str = "0"
    token_limiter: RateLimiter = field(default_factory=RateLimiter)
    tokenizer_sha256: str = ""  # what stored token ids are tagged with (default: the tokenizer's sha256)
    # LoRA adapters served beside the base (serve/adapters.py): name -> the folder it was loaded from. A request's
    # model "name" or "MODEL_ID:name" routes to it; the base checkpoint folder is what an adapter must be trained on
    adapters: dict[str, str] = field(default_factory=dict)
    base_path: str = ""
    adapter_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one load or unload at a time
    latency: object | None = None  # the app's metrics.RequestLatency (set by create_app), which generations feed

    def __post_init__(self):
        if not self.tokenizer_sha256:
            self.tokenizer_sha256 = getattr(self.tokenizer, "sha256", "") or ""

    @property
    def context(self) -> int:
        return self.scheduler.config.max_seq_len


def server_state(request: Request) -> ServerState:
    """The ServerState of the app serving `request` (create_app puts it in app.state)."""
    return request.app.state.palmchat


async def caller(request: Request) -> str:
    """The owner of what this request creates or reads: an API key's id, or '' on a server started with
    --no-auth. Also takes one request from that key's rate-limit bucket, and leaves the key's role in
    request.state.role for the role checks below."""
    state = server_state(request)
    owner, rate, role = "", state.rate_limit, "admin"
    if not state.no_auth:
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        secret = secret.strip() if scheme.lower() == "bearer" else ""
        key = state.store.key_by_hash(hash_secret(secret)) if secret else None
        if key is None:
            raise APIError(401, unauthorized_message(state, secret), code="invalid_api_key",
                           headers={"www-authenticate": "Bearer"})
        owner, rate = key["id"], key["rate_limit"] or state.rate_limit
        role = key["role"] if key["role"] in ROLES else "user"  # a role this version does not know grants nothing
    request.state.role = role
    wait = state.limiter.take(owner or "anonymous", parse_rate(rate))
    if wait:
        raise APIError(429, f"Rate limit reached ({rate}). Please try again in {wait:.1f}s.", type="requests",
                       code="rate_limit_exceeded", headers={"retry-after": retry_after_header(wait)})
    return owner


def unauthorized_message(state: ServerState, secret: str) -> str:
    if state.store.active_key_count() == 0:  # asked only on a failure: a good key costs one lookup
        return ("This server has no active API key yet, so it answers no request. Its operator creates one with "
                "`palmchat keys create --db DB` (or, for one person on this machine, restarts it with --no-auth).")
    if secret:
        return "Incorrect API key provided."
    return "You didn't provide an API key. Send it in an 'Authorization: Bearer KEY' header."


def check_role(request: Request, role: str) -> None:
    """A 403 unless the caller's key (authenticated by `caller`) has `role` or a role above it."""
    if ROLES.index(request.state.role) < ROLES.index(role):
        raise APIError(403, f"This endpoint needs a key with the role '{role}'"
                            f"{' or admin' if role != 'admin' else ''}; this key's role is '{request.state.role}' "
                            f"(the server's operator creates one with `palmchat keys create --role {role}`).",
                       type="permission_error", code="forbidden")


async def labeller_key(request: Request, owner: str = Depends(caller)) -> str:
    """`caller`, for the labelling queue: its rankings become training data, so only labellers and admins."""
    check_role(request, "labeller")
    return owner


async def admin_key(request: Request, owner: str = Depends(caller)) -> str:
    """`caller`, for the admin endpoints (swapping models in)."""
    check_role(request, "admin")
    return owner


def owned_conversation(state: ServerState, owner: str, conversation_id: str) -> dict:
    """The caller's conversation, or a 404 (also for another key's conversation)."""
    conversation = state.store.get_conversation(owner, conversation_id)
    if conversation is None:
        raise not_found("Conversation", conversation_id)
    return conversation
