"""What every endpoint shares: the ServerState built around a loaded model, the request -> state lookup, and
`caller`, the dependency that authenticates a request and takes it from its key's rate limit."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from palmchat.serve.errors import APIError, not_found
from palmchat.serve.keys import RateLimiter, hash_secret, parse_rate, retry_after_header


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
    require_key: bool = False  # refuse requests without a key even when the database holds none
    # a server on loopback answers only requests addressed to these host names and from pages of the same (a web
    # page elsewhere reaching it by DNS rebinding or cross-site requests is refused); None: no check
    local_hosts: frozenset[str] | None = None
    limiter: RateLimiter = field(default_factory=RateLimiter)
    tokenizer_sha256: str = ""  # what stored token ids are tagged with (default: the tokenizer's sha256)

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
    """The owner of what this request creates or reads: an API key's id, or '' on a server without keys.
    Also takes one request from that key's rate-limit bucket."""
    state = server_state(request)
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


def owned_conversation(state: ServerState, owner: str, conversation_id: str) -> dict:
    """The caller's conversation, or a 404 (also for another key's conversation)."""
    conversation = state.store.get_conversation(owner, conversation_id)
    if conversation is None:
        raise not_found("Conversation", conversation_id)
    return conversation
