"""Durable server state in one SQLite file: API keys, stored responses, conversations and their items.

What is stored, and why in this form:
- a response row holds the OpenAI-shaped body returned to the client, its input items, and `context`: the token
  ids of the whole conversation so far (prompt without `instructions` + the reply up to its end-of-turn token).
  A follow-up with `previous_response_id` appends its new turn to those ids instead of re-rendering text, so its
  prompt starts with exactly the tokens whose K/V the scheduler's prefix cache holds;
- a conversation is an ordered list of items; each item keeps the token ids it contributes (a user turn, or
  `<|assistant|>` + the sampled reply + `<|end|>`), so the conversation's context is bos + their concatenation;
- an API key is kept only as the sha256 of its secret (keys are 256-bit random, so no salt or slow hash is
  needed: there is nothing to brute-force), with a short prefix to recognise it by in `palmchat keys list`.

Durability: WAL journal, `synchronous=FULL` (each commit is fsynced: one fsync per turn is nothing next to
generating the turn, and a turn the client was told about then survives a power cut, not only a killed server),
every write in one transaction. One connection shared by the event loop and worker threads, behind a lock.
The schema is versioned with `PRAGMA user_version`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    hash        TEXT NOT NULL UNIQUE,      -- sha256 hex of the secret
    prefix      TEXT NOT NULL,             -- the first characters of the secret, for people to tell keys apart
    rate_limit  TEXT,                      -- e.g. '60/min', or NULL for the server's --rate-limit
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
CREATE TABLE conversations (
    id          TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,             -- api_keys.id, or '' when the server runs without keys
    created_at  INTEGER NOT NULL,
    metadata    TEXT NOT NULL              -- JSON object
);
CREATE TABLE items (
    id              TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position        INTEGER NOT NULL,
    body            TEXT NOT NULL,         -- the OpenAI item (JSON)
    tokens          BLOB NOT NULL,         -- uint32 little-endian token ids this item adds to the context
    UNIQUE (conversation_id, position)
);
CREATE TABLE responses (
    id              TEXT PRIMARY KEY,
    owner           TEXT NOT NULL,
    created_at      REAL NOT NULL,
    body            TEXT NOT NULL,         -- the OpenAI response object (JSON)
    input_items     TEXT NOT NULL,         -- JSON list
    context         BLOB NOT NULL,         -- uint32 token ids of the conversation including this reply
    conversation_id TEXT
);
"""


def pack_ids(ids) -> bytes:
    return np.asarray(ids, dtype="<u4").tobytes()


def unpack_ids(blob: bytes) -> list[int]:
    return np.frombuffer(blob, dtype="<u4").tolist()


class StoreError(ValueError):
    pass


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            raise FileNotFoundError(f"--db: folder {self.path.parent} does not exist")
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a palmchat database ({e})") from None
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        with self.transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                tables = db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
                if tables:
                    raise StoreError(f"{self.path}: an SQLite file that is not a palmchat database")
                for statement in _SCHEMA.split(";"):  # executescript() would commit halfway
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: database schema v{version} is newer than this palmchat (v{SCHEMA_VERSION})")

    @contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT under the lock; ROLLBACK on any error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args=()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def integrity_check(self) -> str:
        return self._read("PRAGMA integrity_check")[0][0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- API keys -----------------------------------------------------------------------------------

    def add_key(self, key_id: str, name: str, secret_hash: str, prefix: str, rate_limit: str | None) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, NULL)",
                       (key_id, name, secret_hash, prefix, rate_limit, int(time.time())))

    def keys(self) -> list[dict]:
        rows = self._read("SELECT id, name, prefix, rate_limit, created_at, revoked_at FROM api_keys ORDER BY created_at, id")
        return [dict(zip(("id", "name", "prefix", "rate_limit", "created_at", "revoked_at"), r)) for r in rows]

    def active_key_count(self) -> int:
        return self._read("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")[0][0]

    def key_by_hash(self, secret_hash: str) -> dict | None:
        rows = self._read("SELECT id, rate_limit FROM api_keys WHERE hash = ? AND revoked_at IS NULL", (secret_hash,))
        return {"id": rows[0][0], "rate_limit": rows[0][1]} if rows else None

    def revoke_key(self, key_id_or_name: str) -> list[str]:
        with self.transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM api_keys WHERE (id = ? OR name = ?) AND revoked_at IS NULL",
                                            (key_id_or_name, key_id_or_name))]
            db.executemany("UPDATE api_keys SET revoked_at = ? WHERE id = ?", [(int(time.time()), i) for i in ids])
        return ids

    # -- responses ------------------------------------------------------------------------------------

    def get_response(self, owner: str, response_id: str) -> dict | None:
        """{"body", "input_items", "context", "conversation_id"} of one of `owner`'s responses, or None."""
        rows = self._read("SELECT body, input_items, context, conversation_id FROM responses WHERE id = ? AND owner = ?",
                          (response_id, owner))
        if not rows:
            return None
        body, items, context, conversation_id = rows[0]
        return {"body": json.loads(body), "input_items": json.loads(items), "context": unpack_ids(context),
                "conversation_id": conversation_id}

    def delete_response(self, owner: str, response_id: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner)).rowcount > 0

    def commit_turn(self, owner: str, response: dict | None, input_items: list[dict], context: list[int],
                    conversation_id: str | None, new_items: list[tuple[dict, list[int]]]) -> None:
        """One turn in one transaction: the response (when stored) and the items it adds to its conversation."""
        with self.transaction() as db:
            if response is not None:
                db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (response["id"], owner, response["created_at"], json.dumps(response),
                            json.dumps(input_items), pack_ids(context), conversation_id))
            if conversation_id is not None and new_items:
                self._append_items(db, owner, conversation_id, new_items)

    # -- conversations --------------------------------------------------------------------------------

    def create_conversation(self, owner: str, conversation: dict, items: list[tuple[dict, list[int]]]) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?)",
                       (conversation["id"], owner, conversation["created_at"], json.dumps(conversation["metadata"])))
            self._append_items(db, owner, conversation["id"], items)

    def get_conversation(self, owner: str, conversation_id: str) -> dict | None:
        rows = self._read("SELECT created_at, metadata FROM conversations WHERE id = ? AND owner = ?",
                          (conversation_id, owner))
        if not rows:
            return None
        return {"id": conversation_id, "object": "conversation", "created_at": rows[0][0],
                "metadata": json.loads(rows[0][1])}

    def update_conversation(self, owner: str, conversation_id: str, metadata: dict) -> bool:
        with self.transaction() as db:
            return db.execute("UPDATE conversations SET metadata = ? WHERE id = ? AND owner = ?",
                              (json.dumps(metadata), conversation_id, owner)).rowcount > 0

    def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?",
                              (conversation_id, owner)).rowcount > 0

    def _append_items(self, db, owner: str, conversation_id: str, items: list[tuple[dict, list[int]]]) -> None:
        if not db.execute("SELECT 1 FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)).fetchone():
            raise KeyError(conversation_id)  # deleted while the turn was generated
        last = db.execute("SELECT coalesce(max(position), -1) FROM items WHERE conversation_id = ?",
                          (conversation_id,)).fetchone()[0]
        db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?)",
                       [(item["id"], conversation_id, last + 1 + i, json.dumps(item), pack_ids(tokens))
                        for i, (item, tokens) in enumerate(items)])

    def add_items(self, owner: str, conversation_id: str, items: list[tuple[dict, list[int]]]) -> None:
        with self.transaction() as db:
            self._append_items(db, owner, conversation_id, items)

    def items(self, conversation_id: str) -> list[dict]:
        """The conversation's items in order (the caller checked the owner)."""
        rows = self._read("SELECT body FROM items WHERE conversation_id = ? ORDER BY position", (conversation_id,))
        return [json.loads(r[0]) for r in rows]

    def get_item(self, conversation_id: str, item_id: str) -> dict | None:
        rows = self._read("SELECT body FROM items WHERE conversation_id = ? AND id = ?", (conversation_id, item_id))
        return json.loads(rows[0][0]) if rows else None

    def delete_item(self, conversation_id: str, item_id: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM items WHERE conversation_id = ? AND id = ?",
                              (conversation_id, item_id)).rowcount > 0

    def context(self, conversation_id: str) -> list[int]:
        """The conversation's token ids without the leading bos: its items' tokens, in order."""
        rows = self._read("SELECT tokens FROM items WHERE conversation_id = ? ORDER BY position", (conversation_id,))
        return [t for r in rows for t in unpack_ids(r[0])]
