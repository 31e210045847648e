"""API keys, their roles, and per-key rate limits.

    palmchat keys create --db palmchat.db --name alice                  # prints the secret once: pc-...
    palmchat keys create --db palmchat.db --name ann --role labeller    # may also use the labelling queue
    palmchat keys create --db palmchat.db --name loop --role admin      # and POST /v1/admin/reload (= --admin)
    palmchat keys list --db palmchat.db
    palmchat keys revoke --db palmchat.db alice             # by name or id; takes effect at the next request

A key is `pc-` + 43 url-safe characters (256 random bits). The database keeps only its sha256 (see store.py), so
a copy of the database does not give anyone access. A key's role says what it may do (ROLES, each role may do
what the ones before it may): `user` chats, rates and compares replies in its own conversations; `labeller` also
ranks the labelling queue, whose rankings `palmchat loop` trains on; `admin` also swaps models in. A server
needs a key on every request unless it was started with `--no-auth` (loopback only; see run.py).
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass

from palmchat.utils.args import arg

KEY_PREFIX = "pc-"
ROLES = ("user", "labeller", "admin")  # each may do everything the ones before it may


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def parse_rate(text: str | None) -> float | None:
    """'60/min' (also /s, /h; a bare number is per minute) -> requests per second; '0' or '' -> None (no limit)."""
    if text is None or str(text).strip() in ("", "0", "off", "none"):
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour))?\s*", str(text))
    if not m:
        raise ValueError(f"rate limit {text!r}: expected N/min, N/s or N/hour (or 0 for none)")
    per = {"s": 1, "sec": 1, "second": 1, "h": 3600, "hour": 3600}.get(m.group(2) or "min", 60)
    rate = float(m.group(1)) / per
    return rate if rate > 0 else None


class RateLimiter:
    """A token bucket per key: `capacity` units at once (the per-minute count, at least 1), refilled at `rate` per
    second; a unit is a request (--rate-limit) or a model token (--token-rate-limit)."""

    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last update)
        self._lock = threading.Lock()

    def take(self, key: str, rate: float | None, cost: float = 1.0) -> float:
        """Take `cost` from `key`'s bucket: 0 when it may go on, else the seconds until it could (inf when `cost` is
        more than the bucket holds when full)."""
        if rate is None:
            return 0.0
        capacity = max(1.0, rate * 60)
        if cost > capacity:
            return math.inf
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * rate)
            if tokens >= cost:
                self._buckets[key] = (tokens - cost, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (cost - tokens) / rate


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


# -- the `palmchat keys` commands ---------------------------------------------------------------------


@dataclass
class KeysCreateArgs:
    """Create an API key (printed once; only its hash is stored)."""

    name: str = arg("", "a name to recognise the key by (default: its id)")
    db: str = arg("palmchat.db", "the server's database file")
    rate_limit: str = arg("", "this key's rate limit, e.g. 60/min (default: the server's --rate-limit)")
    role: str = arg("user", "user: chat, feedback, compare; labeller: also the labelling queue (/label, "
                            "/v1/label/*); admin: also POST /v1/admin/reload (palmchat loop)", choices=list(ROLES))
    admin: bool = arg(False, "the same as --role admin")


@dataclass
class KeysListArgs:
    """List the API keys (never their secrets)."""

    db: str = arg("palmchat.db", "the server's database file")


@dataclass
class KeysRevokeArgs:
    """Revoke an API key by id or name; it stops working at the next request."""

    key: str = arg("", "key id or name", positional=True)
    db: str = arg("palmchat.db", "the server's database file")


def create_key(store, name: str = "", rate_limit: str = "", role: str = "user") -> tuple[str, str]:
    """Add a key to `store`; returns (key id, secret)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    if rate_limit:
        parse_rate(rate_limit)  # fail now, not at the first request
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = "key_" + secrets.token_hex(6)
    store.add_key(key_id, name or key_id, hash_secret(secret), secret[:8], rate_limit or None, role)
    return key_id, secret


def create_main(args: KeysCreateArgs) -> None:
    from palmchat.store import Store

    if args.admin and args.role not in ("user", "admin"):
        raise ValueError(f"--admin is --role admin: it contradicts --role {args.role}")
    role = "admin" if args.admin else args.role
    store = Store(args.db)
    try:
        key_id, secret = create_key(store, args.name, args.rate_limit, role)
    finally:
        store.close()
    print(f"created {role} key {key_id} ({args.name or key_id}); the secret is shown only now:")
    print(secret)


def list_main(args: KeysListArgs) -> None:
    from palmchat.store import Store

    store = Store(args.db)
    try:
        keys = store.keys()
    finally:
        store.close()
    if not keys:
        print(f"no API keys in {args.db}: a server on it answers every request with 401 (unless started with "
              f"--no-auth, on loopback only). Create one with `palmchat keys create --db {args.db}`")
        return
    for k in keys:
        revoked = time.strftime("%Y-%m-%d %H:%M", time.localtime(k["revoked_at"])) if k["revoked_at"] else ""
        state = f"revoked {revoked}" if revoked else "active"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(k["created_at"]))
        limit = k["rate_limit"] or "server default"
        print(f"{k['id']}  {k['name']:<20} {k['role']:<8}  {k['prefix']}...  created {created}  rate {limit}  "
              f"{state}")


def revoke_main(args: KeysRevokeArgs) -> None:
    from palmchat.store import Store

    store = Store(args.db)
    try:
        revoked = store.revoke_key(args.key)
    finally:
        store.close()
    if not revoked:
        raise ValueError(f"no active key with id or name {args.key!r} in {args.db}")
    print("revoked " + ", ".join(revoked))
