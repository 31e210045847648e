"""Durable server state in one SQLite file: API keys, stored responses, conversations and their items.

What is stored, and why in this form:
- a response row holds the OpenAI-shaped body returned to the client, its input items, and `context`: the token
  ids of the whole conversation so far (prompt without `instructions` + the reply up to its end-of-turn token).
  A follow-up with `previous_response_id` appends its new turn to those ids instead of re-rendering text, so its
  prompt starts with exactly the tokens whose K/V the scheduler's prefix cache holds;
- a conversation is an ordered list of items; each item keeps the token ids it contributes (a user turn, or
  `<|assistant|>` + the sampled reply + `<|end|>`), so the conversation's context is bos + their concatenation;
- token ids mean nothing without their tokenizer, and the server may be restarted with a checkpoint of another
  one: every stored list of ids carries the sha256 of the tokenizer that made it (`tokenizer`, schema v3), and a
  response also keeps its context as text (`messages`). The server uses stored ids only under the tokenizer they
  name, and otherwise renders the conversation again from its text (palmchat/serve/routes/responses.py);
- an API key is kept only as the sha256 of its secret (keys are 256-bit random, so no salt or slow hash is
  needed: there is nothing to brute-force), with a short prefix to recognise it by in `palmchat keys list`;
- human feedback (schema v2, palmchat/feedback/exchange.py reads it back for export): `feedback` holds thumbs up/down on
  a reply, `tasks` a prompt with 2-4 candidate replies to rank (kind 'label': the labelling queue; kind
  'compare': candidates the chat page asked for), `rankings` one ranking of a task per labeller. Feedback rows
  keep a copy of the prompt and reply text: they are training examples, and stay when the conversation they
  came from is deleted.

Durability: WAL journal, `synchronous=FULL` (each commit is fsynced: one fsync per turn is nothing next to
generating the turn, and a turn the client was told about then survives a power cut, not only a killed server),
every write in one transaction. One connection shared by the event loop and worker threads, behind a lock.
The schema is versioned with `PRAGMA user_version`; an older database is upgraded in place when opened
(`_MIGRATIONS[v]` takes v-1 to v, all in one transaction).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 3

SCHEMA_V1 = """
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

SCHEMA_V2 = """
ALTER TABLE api_keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0;   -- may call /v1/admin/*
CREATE TABLE feedback (
    id              TEXT PRIMARY KEY,
    owner           TEXT NOT NULL,
    conversation_id TEXT NOT NULL,     -- no foreign key: feedback outlives the conversation
    item_id         TEXT NOT NULL,     -- the assistant item rated
    rating          INTEGER NOT NULL,  -- 1 (thumbs up) or -1 (thumbs down)
    comment         TEXT NOT NULL,
    prompt          TEXT NOT NULL,     -- JSON messages the reply answered (ends with a user message)
    reply           TEXT NOT NULL,
    created_at      REAL NOT NULL,
    UNIQUE (owner, item_id)
);
CREATE TABLE tasks (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,     -- 'label' (imported queue) or 'compare' (from the chat page)
    owner           TEXT NOT NULL,     -- compare: who asked, label: ''
    conversation_id TEXT,              -- compare: the conversation the chosen reply continues
    prompt          TEXT NOT NULL,     -- JSON messages, ending with a user message
    candidates      TEXT,              -- JSON [{"id", "text"}], NULL until generated (label tasks)
    params          TEXT NOT NULL,     -- JSON: label: {"k", "max_tokens", "temperature"}, compare: what commits
    created_at      REAL NOT NULL
);
CREATE INDEX tasks_kind ON tasks (kind, created_at);
CREATE TABLE rankings (
    task_id         TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    labeller        TEXT NOT NULL,     -- api_keys.id, or a name on a server without keys
    ranking         TEXT NOT NULL,     -- JSON candidate ids, best first
    created_at      REAL NOT NULL,
    PRIMARY KEY (task_id, labeller)
)
"""

SCHEMA_V3 = """
ALTER TABLE items ADD COLUMN tokenizer TEXT;      -- sha256 of the tokenizer of `tokens` (NULL: stored before v3)
ALTER TABLE responses ADD COLUMN tokenizer TEXT;  -- sha256 of the tokenizer of `context` (NULL: stored before v3)
ALTER TABLE responses ADD COLUMN messages TEXT;   -- JSON [{"role", "content"}]: `context` as text (NULL before v3)
"""

_MIGRATIONS = {1: SCHEMA_V1, 2: SCHEMA_V2, 3: SCHEMA_V3}


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
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: database schema v{version} is newer than this palmchat "
                                 f"(v{SCHEMA_VERSION})")
            if version == 0 and db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]:
                raise StoreError(f"{self.path}: an SQLite file that is not a palmchat database")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step].split(";"):  # executescript() would commit halfway
                    if statement.strip():
                        db.execute(statement)
            if version != SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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

    def add_key(self, key_id: str, name: str, secret_hash: str, prefix: str, rate_limit: str | None,
                admin: bool = False) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                       (key_id, name, secret_hash, prefix, rate_limit, int(time.time()), int(admin)))

    def keys(self) -> list[dict]:
        fields = ("id", "name", "prefix", "rate_limit", "created_at", "revoked_at", "admin")
        rows = self._read(f"SELECT {', '.join(fields)} FROM api_keys ORDER BY created_at, id")
        return [dict(zip(fields, r)) for r in rows]

    def active_key_count(self) -> int:
        return self._read("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")[0][0]

    def key_by_hash(self, secret_hash: str) -> dict | None:
        rows = self._read("SELECT id, rate_limit, admin, name FROM api_keys WHERE hash = ? AND revoked_at IS NULL",
                          (secret_hash,))
        return dict(zip(("id", "rate_limit", "admin", "name"), rows[0])) if rows else None

    def is_admin(self, key_id: str) -> bool:
        rows = self._read("SELECT admin FROM api_keys WHERE id = ? AND revoked_at IS NULL", (key_id,))
        return bool(rows and rows[0][0])

    def revoke_key(self, key_id_or_name: str) -> list[str]:
        with self.transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM api_keys WHERE (id = ? OR name = ?) AND revoked_at IS NULL",
                                            (key_id_or_name, key_id_or_name))]
            db.executemany("UPDATE api_keys SET revoked_at = ? WHERE id = ?", [(int(time.time()), i) for i in ids])
        return ids

    # -- responses ------------------------------------------------------------------------------------

    def get_response(self, owner: str, response_id: str) -> dict | None:
        """{"body", "input_items", "context", "conversation_id", "tokenizer", "messages"} of one of `owner`'s
        responses, or None. `tokenizer` is the sha256 of the tokenizer of `context`, `messages` the context as
        text (both None for a response stored before schema v3)."""
        rows = self._read("SELECT body, input_items, context, conversation_id, tokenizer, messages FROM responses "
                          "WHERE id = ? AND owner = ?", (response_id, owner))
        if not rows:
            return None
        body, items, context, conversation_id, tokenizer, messages = rows[0]
        return {"body": json.loads(body), "input_items": json.loads(items), "context": unpack_ids(context),
                "conversation_id": conversation_id, "tokenizer": tokenizer,
                "messages": None if messages is None else json.loads(messages)}

    def delete_response(self, owner: str, response_id: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner)).rowcount > 0

    def commit_turn(self, owner: str, response: dict | None, input_items: list[dict], context: list[int],
                    conversation_id: str | None, new_items: list[tuple[dict, list[int]]],
                    tokenizer: str | None = None, messages: list[dict] | None = None) -> None:
        """One turn in one transaction: the response (when stored) and the items it adds to its conversation.
        `tokenizer`: the sha256 of the tokenizer of `context` and of the items' ids; `messages`: `context` as text
        ({"role", "content"} each), from which it can be rendered again under another tokenizer."""
        with self.transaction() as db:
            if response is not None:
                db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (response["id"], owner, response["created_at"], json.dumps(response),
                            json.dumps(input_items), pack_ids(context), conversation_id, tokenizer,
                            None if messages is None else json.dumps(messages)))
            if conversation_id is not None and new_items:
                self._append_items(db, owner, conversation_id, new_items, tokenizer)

    def instructions_of_item(self, owner: str, conversation_id: str, item_id: str) -> str | None:
        """The `instructions` the assistant item was generated with (they are not in the conversation itself): from
        the stored response that output it, or the comparison it was chosen from."""
        rows = self._read("SELECT body FROM responses WHERE owner = ? AND conversation_id = ? AND body LIKE ?",
                          (owner, conversation_id, f'%"{item_id}"%'))
        for (body,) in rows:
            response = json.loads(body)
            if any(o.get("id") == item_id for o in response["output"]):
                return response.get("instructions")
        rows = self._read("SELECT params FROM tasks WHERE kind = 'compare' AND owner = ? AND conversation_id = ? "
                          "AND candidates LIKE ?", (owner, conversation_id, f'%"{item_id}"%'))
        return json.loads(rows[0][0]).get("instructions") if rows else None

    # -- conversations --------------------------------------------------------------------------------

    def create_conversation(self, owner: str, conversation: dict, items: list[tuple[dict, list[int]]],
                            tokenizer: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?)",
                       (conversation["id"], owner, conversation["created_at"], json.dumps(conversation["metadata"])))
            self._append_items(db, owner, conversation["id"], items, tokenizer)

    def get_conversation(self, owner: str, conversation_id: str) -> dict | None:
        rows = self._read("SELECT created_at, metadata FROM conversations WHERE id = ? AND owner = ?",
                          (conversation_id, owner))
        if not rows:
            return None
        return {"id": conversation_id, "object": "conversation", "created_at": rows[0][0],
                "metadata": json.loads(rows[0][1])}

    def list_conversations(self, owner: str) -> list[dict]:
        """`owner`'s conversations, oldest first."""
        rows = self._read("SELECT id, created_at, metadata FROM conversations WHERE owner = ? "
                          "ORDER BY created_at, rowid", (owner,))
        return [{"id": i, "object": "conversation", "created_at": c, "metadata": json.loads(m)} for i, c, m in rows]

    def update_conversation(self, owner: str, conversation_id: str, metadata: dict) -> bool:
        with self.transaction() as db:
            return db.execute("UPDATE conversations SET metadata = ? WHERE id = ? AND owner = ?",
                              (json.dumps(metadata), conversation_id, owner)).rowcount > 0

    def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?",
                              (conversation_id, owner)).rowcount > 0

    def _append_items(self, db, owner: str, conversation_id: str, items: list[tuple[dict, list[int]]],
                      tokenizer: str | None) -> None:
        owned = db.execute("SELECT 1 FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner))
        if not owned.fetchone():
            raise KeyError(conversation_id)  # deleted while the turn was generated
        last = db.execute("SELECT coalesce(max(position), -1) FROM items WHERE conversation_id = ?",
                          (conversation_id,)).fetchone()[0]
        db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)",
                       [(item["id"], conversation_id, last + 1 + i, json.dumps(item), pack_ids(tokens), tokenizer)
                        for i, (item, tokens) in enumerate(items)])

    def add_items(self, owner: str, conversation_id: str, items: list[tuple[dict, list[int]]],
                  tokenizer: str | None = None) -> None:
        """Append items, each with the token ids it adds to the context; `tokenizer`: the sha256 of their tokenizer."""
        with self.transaction() as db:
            self._append_items(db, owner, conversation_id, items, tokenizer)

    def items(self, conversation_id: str) -> list[dict]:
        """The conversation's items in order (the caller checked the owner)."""
        rows = self._read("SELECT body FROM items WHERE conversation_id = ? ORDER BY position", (conversation_id,))
        return [json.loads(r[0]) for r in rows]

    def items_with_tokens(self, conversation_id: str) -> list[tuple[dict, list[int]]]:
        rows = self._read("SELECT body, tokens FROM items WHERE conversation_id = ? ORDER BY position",
                          (conversation_id,))
        return [(json.loads(b), unpack_ids(t)) for b, t in rows]

    def get_item(self, conversation_id: str, item_id: str) -> dict | None:
        rows = self._read("SELECT body FROM items WHERE conversation_id = ? AND id = ?", (conversation_id, item_id))
        return json.loads(rows[0][0]) if rows else None

    def delete_item(self, conversation_id: str, item_id: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM items WHERE conversation_id = ? AND id = ?",
                              (conversation_id, item_id)).rowcount > 0

    def context_items(self, conversation_id: str) -> list[tuple[dict, list[int], str | None]]:
        """(item, token ids, sha256 of their tokenizer or None before schema v3) of each item, in order: what a
        conversation's context is made of, and what to render it from again under another tokenizer."""
        rows = self._read("SELECT body, tokens, tokenizer FROM items WHERE conversation_id = ? ORDER BY position",
                          (conversation_id,))
        return [(json.loads(b), unpack_ids(t), h) for b, t, h in rows]

    # -- feedback: thumbs, comparisons, the labelling queue (schema v2) -----------------------------------

    def put_feedback(self, row: dict) -> dict:
        """Insert a thumbs up/down, or replace `owner`'s earlier rating of the same item; returns the row."""
        with self.transaction() as db:
            old = db.execute("SELECT id FROM feedback WHERE owner = ? AND item_id = ?",
                             (row["owner"], row["item_id"])).fetchone()
            row = {**row, "id": old[0]} if old else row
            db.execute("INSERT OR REPLACE INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (row["id"], row["owner"], row["conversation_id"], row["item_id"], row["rating"], row["comment"],
                        json.dumps(row["prompt"]), row["reply"], row["created_at"]))
        return row

    def feedback(self, owner: str | None = None, conversation_id: str | None = None) -> list[dict]:
        """Thumbs rows (all owners when owner is None), oldest first."""
        where, args = [], []
        for column, value in (("owner", owner), ("conversation_id", conversation_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        fields = ("id", "owner", "conversation_id", "item_id", "rating", "comment", "prompt", "reply", "created_at")
        rows = self._read(f"SELECT {', '.join(fields)} FROM feedback {'WHERE ' + ' AND '.join(where) if where else ''} "
                          f"ORDER BY created_at, rowid", args)
        return [{**dict(zip(fields, r)), "prompt": json.loads(r[6])} for r in rows]

    def add_task(self, task: dict) -> None:
        with self.transaction() as db:
            self._insert_task(db, task)

    @staticmethod
    def _insert_task(db, task: dict) -> None:
        candidates = task.get("candidates")
        db.execute("INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (task["id"], task["kind"], task.get("owner", ""), task.get("conversation_id"),
                    json.dumps(task["prompt"]), None if candidates is None else json.dumps(candidates),
                    json.dumps(task.get("params", {})), task.get("created_at", time.time())))

    def queue_prompts(self, prompts: list[list[dict]], params: dict, new_id) -> int:
        """Add label tasks for prompts not queued yet (same messages); returns how many were added."""
        with self.transaction() as db:
            queued = {r[0] for r in db.execute("SELECT prompt FROM tasks WHERE kind = 'label'")}
            added, now = 0, time.time()
            for prompt in prompts:
                if json.dumps(prompt) in queued:
                    continue
                queued.add(json.dumps(prompt))
                self._insert_task(db, {"id": new_id(), "kind": "label", "prompt": prompt, "params": params,
                                       "created_at": now + added * 1e-6})
                added += 1
        return added

    _TASK_FIELDS = ("id", "kind", "owner", "conversation_id", "prompt", "candidates", "params", "created_at")

    def _task(self, row) -> dict:
        task = dict(zip(self._TASK_FIELDS, row))
        for key in ("prompt", "candidates", "params"):
            task[key] = None if task[key] is None else json.loads(task[key])
        return task

    def get_task(self, task_id: str) -> dict | None:
        rows = self._read(f"SELECT {', '.join(self._TASK_FIELDS)} FROM tasks WHERE id = ?", (task_id,))
        return self._task(rows[0]) if rows else None

    def tasks(self, kind: str | None = None) -> list[dict]:
        where = "WHERE kind = ?" if kind else ""
        rows = self._read(f"SELECT {', '.join(self._TASK_FIELDS)} FROM tasks {where} ORDER BY created_at, rowid",
                          (kind,) if kind else ())
        return [self._task(r) for r in rows]

    def task_count(self, kind: str) -> int:
        return self._read("SELECT count(*) FROM tasks WHERE kind = ?", (kind,))[0][0]

    def next_label_task(self, labeller: str) -> dict | None:
        """The label task `labeller` has not ranked with the fewest rankings so far (the oldest among those).
        Tasks whose candidates are an empty list (the prompt left no room for a reply) are skipped."""
        rows = self._read(f"""SELECT {', '.join('t.' + f for f in self._TASK_FIELDS)} FROM tasks t
            WHERE t.kind = 'label' AND coalesce(t.candidates, '') != '[]'
              AND NOT EXISTS (SELECT 1 FROM rankings r WHERE r.task_id = t.id AND r.labeller = ?)
            ORDER BY (SELECT count(*) FROM rankings r WHERE r.task_id = t.id), t.created_at, t.rowid LIMIT 1""",
                          (labeller,))
        return self._task(rows[0]) if rows else None

    def set_candidates(self, task_id: str, candidates: list[dict]) -> dict:
        """Store a task's candidates unless another request stored them first; returns the task as stored."""
        with self.transaction() as db:
            db.execute("UPDATE tasks SET candidates = ? WHERE id = ? AND candidates IS NULL",
                       (json.dumps(candidates), task_id))
        return self.get_task(task_id)

    def add_ranking(self, task_id: str, labeller: str, ranking: list[str], replace: bool = True) -> bool:
        """Store (or replace) `labeller`'s ranking of a task; False when one exists and replace is False."""
        with self.transaction() as db:
            if not replace and db.execute("SELECT 1 FROM rankings WHERE task_id = ? AND labeller = ?",
                                          (task_id, labeller)).fetchone():
                return False
            db.execute("INSERT OR REPLACE INTO rankings VALUES (?, ?, ?, ?)",
                       (task_id, labeller, json.dumps(ranking), time.time()))
        return True

    def commit_comparison(self, owner: str, task: dict, labeller: str, ranking: list[str],
                          items: list[tuple[dict, list[int]]], tokenizer: str | None = None) -> None:
        """One transaction: the ranking of a compare task and the turn it adds to its conversation (ids of the
        tokenizer whose sha256 is `tokenizer`). KeyError if the conversation is gone, StoreError if it changed since
        the candidates were sampled or was ranked."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM rankings WHERE task_id = ?", (task["id"],)).fetchone():
                raise StoreError("this comparison was ranked already")
            if not db.execute("SELECT 1 FROM conversations WHERE id = ? AND owner = ?",
                              (task["conversation_id"], owner)).fetchone():
                raise KeyError(task["conversation_id"])
            tokens = [t for r in db.execute("SELECT tokens FROM items WHERE conversation_id = ? ORDER BY position",
                                            (task["conversation_id"],)) for t in unpack_ids(r[0])]
            if context_digest(tokens) != task["params"]["context_digest"]:
                raise StoreError("the conversation changed after these candidates were generated; compare again")
            db.execute("INSERT INTO rankings VALUES (?, ?, ?, ?)",
                       (task["id"], labeller, json.dumps(ranking), time.time()))
            self._append_items(db, owner, task["conversation_id"], items, tokenizer)

    def rankings(self, kind: str | None = None) -> list[dict]:
        """{"task_id", "labeller", "ranking", "created_at"} of every ranking (of `kind` tasks), oldest first."""
        join = "JOIN tasks t ON t.id = r.task_id WHERE t.kind = ?" if kind else ""
        rows = self._read(f"SELECT r.task_id, r.labeller, r.ranking, r.created_at FROM rankings r {join} "
                          f"ORDER BY r.created_at, r.rowid", (kind,) if kind else ())
        return [{"task_id": t, "labeller": lab, "ranking": json.loads(rk), "created_at": c} for t, lab, rk, c in rows]


def context_digest(tokens: list[int]) -> str:
    """A short fingerprint of a conversation's token ids (a comparison checks the conversation did not change)."""
    return hashlib.sha256(pack_ids(tokens)).hexdigest()[:32]
