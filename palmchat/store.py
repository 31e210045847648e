"""Durable server state in one SQLite file: API keys, stored responses, conversations and their items.

What is stored, and why in this form:
- a response row holds the OpenAI-shaped body returned to the client, its input items, and its context: the token
  ids of the whole conversation so far (prompt without `instructions` + the reply up to its end-of-turn token).
  A follow-up with `previous_response_id` appends its new turn to those ids instead of re-rendering text, so its
  prompt starts with exactly the tokens whose K/V the scheduler's prefix cache holds. Each turn's ids are stored
  once (schema v5): a response that continues another keeps only what it adds (`previous_id` names the one it
  continues), and one in a conversation keeps nothing but the item that ends it (`context_item`: its context is
  the conversation's branch up to that item). Deleting a response others continue first copies its part into them;
  deleting a conversation deletes its responses;
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
every write in one transaction. Writes go through one connection behind a lock; reads through a connection of
their own per thread, so that in WAL mode a read never waits for a writer's fsync (nor a writer for a read).
The schema is versioned with `PRAGMA user_version`; an older database is upgraded in place when opened
(`_MIGRATIONS[v]` takes v-1 to v, all in one transaction).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 5

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

SCHEMA_V4 = """
ALTER TABLE items ADD COLUMN parent_id TEXT;                -- the item before this one in its branch (NULL: first)
ALTER TABLE conversations ADD COLUMN current_item TEXT;     -- the last item of the branch shown and continued
UPDATE items SET parent_id = (SELECT p.id FROM items p WHERE p.conversation_id = items.conversation_id
                              AND p.position < items.position ORDER BY p.position DESC LIMIT 1);
UPDATE conversations SET current_item = (SELECT i.id FROM items i WHERE i.conversation_id = conversations.id
                                         ORDER BY i.position DESC LIMIT 1);
ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'user';   -- user, labeller or admin
UPDATE api_keys SET role = 'admin' WHERE admin = 1;
CREATE INDEX items_parent ON items (conversation_id, parent_id);
CREATE INDEX conversations_owner ON conversations (owner, created_at);
CREATE INDEX responses_owner ON responses (owner, created_at);
CREATE INDEX responses_conversation ON responses (conversation_id);
CREATE INDEX feedback_owner ON feedback (owner, conversation_id);
CREATE INDEX tasks_conversation ON tasks (conversation_id)
"""

SCHEMA_V5 = """
ALTER TABLE responses ADD COLUMN previous_id TEXT;   -- context and messages continue this response's (NULL: whole)
ALTER TABLE responses ADD COLUMN context_item TEXT;  -- the context is its conversation's branch up to this item
CREATE INDEX responses_previous ON responses (previous_id)
"""

_MIGRATIONS = {1: SCHEMA_V1, 2: SCHEMA_V2, 3: SCHEMA_V3, 4: SCHEMA_V4, 5: SCHEMA_V5}


def pack_ids(ids) -> bytes:
    return np.asarray(ids, dtype="<u4").tobytes()


def unpack_ids(blob: bytes) -> list[int]:
    return np.frombuffer(blob, dtype="<u4").tolist()


class StoreError(ValueError):
    pass


CURRENT = object()  # "the end of the conversation's current branch", where a turn is appended by default


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            raise FileNotFoundError(f"--db: folder {self.path.parent} does not exist")
        self._lock = threading.RLock()
        self._local = threading.local()  # each thread's read connection
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()  # not the writer's lock: a read must never wait for a write
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

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            db.execute("PRAGMA query_only=ON")
            self._local.db = db
            with self._readers_lock:
                self._readers.append(db)
        return db

    def _read(self, sql: str, args=()) -> list[tuple]:
        return self._reader().execute(sql, args).fetchall()

    @contextmanager
    def _snapshot(self):
        """Several reads that see one state of the database (one read transaction)."""
        db = self._reader()
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")

    def integrity_check(self) -> str:
        return self._read("PRAGMA integrity_check")[0][0]

    def close(self) -> None:
        with self._lock, self._readers_lock:
            for db in self._readers:
                db.close()
            self._db.close()

    # -- API keys -----------------------------------------------------------------------------------

    def add_key(self, key_id: str, name: str, secret_hash: str, prefix: str, rate_limit: str | None,
                role: str = "user") -> None:
        """Store a key by the hash of its secret; `role` is user, labeller or admin (palmchat/serve/state.py)."""
        with self.transaction() as db:
            db.execute("INSERT INTO api_keys (id, name, hash, prefix, rate_limit, created_at, revoked_at, admin, role) "
                       "VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                       (key_id, name, secret_hash, prefix, rate_limit, int(time.time()), int(role == "admin"), role))

    def keys(self) -> list[dict]:
        fields = ("id", "name", "prefix", "rate_limit", "created_at", "revoked_at", "role")
        rows = self._read(f"SELECT {', '.join(fields)} FROM api_keys ORDER BY created_at, id")
        return [dict(zip(fields, r)) for r in rows]

    def active_key_count(self) -> int:
        return self._read("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")[0][0]

    def key_by_hash(self, secret_hash: str) -> dict | None:
        """The active key whose secret hashes to `secret_hash`: {"id", "rate_limit", "role", "name"}, or None."""
        fields = ("id", "rate_limit", "role", "name")
        rows = self._read(f"SELECT {', '.join(fields)} FROM api_keys WHERE hash = ? AND revoked_at IS NULL",
                          (secret_hash,))
        return dict(zip(fields, rows[0])) if rows else None

    def revoke_key(self, key_id_or_name: str) -> list[str]:
        with self.transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM api_keys WHERE (id = ? OR name = ?) AND revoked_at IS NULL",
                                            (key_id_or_name, key_id_or_name))]
            db.executemany("UPDATE api_keys SET revoked_at = ? WHERE id = ?", [(int(time.time()), i) for i in ids])
        return ids

    # -- responses ------------------------------------------------------------------------------------

    def get_response(self, owner: str, response_id: str) -> dict | None:
        """{"body", "input_items", "context", "conversation_id", "tokenizer", "messages", "context_items"} of one of
        `owner`'s responses, or None. `tokenizer` is the sha256 of the tokenizer of `context`, `messages` the context
        as text (both None for a response stored before schema v3). A response of a conversation has its context in
        the conversation: `context_items` (as context_items() gives them) and `context` None; None for both when
        the item that ended it was deleted since."""
        with self._snapshot() as db:
            rows = db.execute("SELECT body, input_items, conversation_id, tokenizer, context_item FROM responses "
                              "WHERE id = ? AND owner = ?", (response_id, owner)).fetchall()
            if not rows:
                return None
            body, items, conversation_id, tokenizer, context_item = rows[0]
            context, messages, context_items = None, None, None
            if context_item is None:
                context, messages = self._context(db, response_id)
            else:
                branch = self._branch(conversation_id, context_item, db)
                if branch and branch[-1][3] == context_item:
                    context_items = [(json.loads(b), unpack_ids(t), h) for b, t, h, _ in branch]
        return {"body": json.loads(body), "input_items": json.loads(items), "context": context,
                "conversation_id": conversation_id, "tokenizer": tokenizer, "messages": messages,
                "context_items": context_items}

    @staticmethod
    def _context(db, response_id: str) -> tuple[list[int], list[dict] | None]:
        """A response's whole context (ids, messages or None), joining the parts of the responses it continues."""
        rows = db.execute("""
            WITH RECURSIVE chain(id, depth) AS (
                SELECT ?, 0
                UNION ALL
                SELECT r.previous_id, chain.depth + 1 FROM responses r JOIN chain ON r.id = chain.id
                WHERE r.previous_id IS NOT NULL)
            SELECT r.context, r.messages FROM chain JOIN responses r ON r.id = chain.id ORDER BY chain.depth DESC""",
                          (response_id,)).fetchall()
        ids = [t for context, _ in rows for t in unpack_ids(context)]
        if any(m is None for _, m in rows):
            return ids, None
        return ids, [m for _, messages in rows for m in json.loads(messages)]

    def _delete_response(self, db, owner: str, response_id: str) -> bool:
        for (child,) in db.execute("SELECT id FROM responses WHERE previous_id = ?", (response_id,)).fetchall():
            context, messages = self._context(db, child)
            db.execute("UPDATE responses SET context = ?, messages = ?, previous_id = NULL WHERE id = ?",
                       (pack_ids(context), None if messages is None else json.dumps(messages), child))
        return db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner)).rowcount > 0

    def delete_response(self, owner: str, response_id: str) -> bool:
        with self.transaction() as db:
            if not db.execute("SELECT 1 FROM responses WHERE id = ? AND owner = ?", (response_id, owner)).fetchone():
                return False
            return self._delete_response(db, owner, response_id)

    def commit_turn(self, owner: str, response: dict | None, input_items: list[dict], context: list[int],
                    conversation_id: str | None, new_items: list[tuple[dict, list[int]]],
                    tokenizer: str | None = None, messages: list[dict] | None = None, after=CURRENT) -> None:
        """One turn in one transaction: the response (when stored) and the items it adds to its conversation.
        `tokenizer`: the sha256 of the tokenizer of `context` and of the items' ids; `messages`: `context` as text
        ({"role", "content"} each), from which it can be rendered again under another tokenizer; `after`: the item
        the new items follow (see _append_items: by default the end of the current branch)."""
        with self.transaction() as db:
            if conversation_id is not None and new_items:
                self._append_items(db, owner, conversation_id, new_items, tokenizer, after)
            if response is None:
                return
            previous_id, context_item = None, None
            if conversation_id is not None and new_items:
                context_item, context, messages = new_items[-1][0]["id"], [], None
            elif response.get("previous_response_id"):
                previous_id, context, messages = self._continued(db, response["previous_response_id"], tokenizer,
                                                                 context, messages)
            db.execute("INSERT INTO responses (id, owner, created_at, body, input_items, context, conversation_id, "
                       "tokenizer, messages, previous_id, context_item) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (response["id"], owner, response["created_at"], json.dumps(response),
                        json.dumps(input_items), pack_ids(context), conversation_id, tokenizer,
                        None if messages is None else json.dumps(messages), previous_id, context_item))

    def _continued(self, db, previous_id: str, tokenizer: str | None, context: list[int],
                   messages: list[dict] | None) -> tuple[str | None, list[int], list[dict] | None]:
        """(previous_id, the part of context and messages to store): only what follows the previous response's
        context when it starts this one (same tokenizer, ids and text), else (None, the whole of them)."""
        row = db.execute("SELECT tokenizer, context_item FROM responses WHERE id = ?", (previous_id,)).fetchone()
        if row is None or row[0] != tokenizer or row[1] is not None or messages is None:
            return None, context, messages
        earlier, earlier_messages = self._context(db, previous_id)
        if earlier_messages is None or context[:len(earlier)] != earlier or \
                messages[:len(earlier_messages)] != earlier_messages:
            return None, context, messages
        return previous_id, context[len(earlier):], messages[len(earlier_messages):]

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

    # -- conversations: trees of items (schema v4) ------------------------------------------------------

    def create_conversation(self, owner: str, conversation: dict, items: list[tuple[dict, list[int]]],
                            tokenizer: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO conversations (id, owner, created_at, metadata) VALUES (?, ?, ?, ?)",
                       (conversation["id"], owner, conversation["created_at"], json.dumps(conversation["metadata"])))
            self._append_items(db, owner, conversation["id"], items, tokenizer)

    def get_conversation(self, owner: str, conversation_id: str) -> dict | None:
        rows = self._read("SELECT created_at, metadata FROM conversations WHERE id = ? AND owner = ?",
                          (conversation_id, owner))
        if not rows:
            return None
        return {"id": conversation_id, "object": "conversation", "created_at": rows[0][0],
                "metadata": json.loads(rows[0][1])}

    def list_conversations(self, owner: str, limit: int | None = None, order: str = "asc",
                           after: str | None = None) -> tuple[list[dict], bool] | list[dict]:
        """`owner`'s conversations, oldest first (`order` "desc": newest first); with `limit`, one page of them from
        the one after `after` and whether more follow (a KeyError when `after` is not one of them)."""
        direction, compare = ("ASC", ">") if order == "asc" else ("DESC", "<")
        where, args = "owner = ?", [owner]
        if after is not None:
            start = self._read("SELECT created_at, rowid FROM conversations WHERE id = ? AND owner = ?", (after, owner))
            if not start:
                raise KeyError(after)
            where += f" AND (created_at, rowid) {compare} (?, ?)"
            args += list(start[0])
        rows = self._read(f"SELECT id, created_at, metadata FROM conversations WHERE {where} "
                          f"ORDER BY created_at {direction}, rowid {direction}"
                          + ("" if limit is None else f" LIMIT {int(limit) + 1}"), args)
        page = [{"id": i, "object": "conversation", "created_at": c, "metadata": json.loads(m)} for i, c, m in rows]
        return page if limit is None else (page[:limit], len(page) > limit)

    def conversation_owners(self) -> list[tuple[str, str]]:
        """(conversation id, owner) of every conversation, oldest first (for exports)."""
        return [tuple(r) for r in self._read("SELECT id, owner FROM conversations ORDER BY created_at, rowid")]

    def update_conversation(self, owner: str, conversation_id: str, metadata: dict) -> bool:
        with self.transaction() as db:
            return db.execute("UPDATE conversations SET metadata = ? WHERE id = ? AND owner = ?",
                              (json.dumps(metadata), conversation_id, owner)).rowcount > 0

    def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        """Delete the conversation, its items and the stored responses of its turns (the feedback given on it stays:
        people gave it as training data)."""
        with self.transaction() as db:
            if not db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?",
                              (conversation_id, owner)).rowcount:
                return False
            for (response_id,) in db.execute("SELECT id FROM responses WHERE conversation_id = ? AND owner = ?",
                                             (conversation_id, owner)).fetchall():
                self._delete_response(db, owner, response_id)
        return True

    def _append_items(self, db, owner: str, conversation_id: str, items: list[tuple[dict, list[int]]],
                      tokenizer: str | None, after=CURRENT) -> None:
        """Append items as one chain after `after` (an item id; None: as a new first item, a new root; by default
        the end of the current branch), and make the last of them the end of the current branch. KeyError when the
        conversation is gone, StoreError when `after` was deleted."""
        row = db.execute("SELECT current_item FROM conversations WHERE id = ? AND owner = ?",
                         (conversation_id, owner)).fetchone()
        if row is None:
            raise KeyError(conversation_id)  # deleted while the turn was generated
        parent = row[0] if after is CURRENT else after
        if parent is not None and not db.execute("SELECT 1 FROM items WHERE id = ? AND conversation_id = ?",
                                                 (parent, conversation_id)).fetchone():
            raise StoreError(f"the message this turn continues ({parent}) was deleted")
        if not items:
            return
        last = db.execute("SELECT coalesce(max(position), -1) FROM items WHERE conversation_id = ?",
                          (conversation_id,)).fetchone()[0]
        rows = []
        for i, (item, tokens) in enumerate(items):
            rows.append((item["id"], conversation_id, last + 1 + i, json.dumps(item), pack_ids(tokens), tokenizer,
                         parent))
            parent = item["id"]
        db.executemany("INSERT INTO items (id, conversation_id, position, body, tokens, tokenizer, parent_id) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        db.execute("UPDATE conversations SET current_item = ? WHERE id = ?", (parent, conversation_id))

    def add_items(self, owner: str, conversation_id: str, items: list[tuple[dict, list[int]]],
                  tokenizer: str | None = None, after=CURRENT) -> None:
        """Append items, each with the token ids it adds to the context; `tokenizer`: the sha256 of their tokenizer;
        `after`: see _append_items."""
        with self.transaction() as db:
            self._append_items(db, owner, conversation_id, items, tokenizer, after)

    def current_item(self, conversation_id: str) -> str | None:
        """The last item of the conversation's current branch (None: no items)."""
        rows = self._read("SELECT current_item FROM conversations WHERE id = ?", (conversation_id,))
        return rows[0][0] if rows else None

    def _branch(self, conversation_id: str, leaf=CURRENT, db=None,
                columns: str = "i.body, i.tokens, i.tokenizer, i.id") -> list[tuple]:
        """`columns` (by default body, tokens, tokenizer, id) of each item from the first to `leaf` (default: the end
        of the current branch), following parents; `db`: the connection to read with (a writer's, inside its
        transaction)."""
        with self._snapshot() if db is None else nullcontext(db) as db:
            if leaf is CURRENT:
                row = db.execute("SELECT current_item FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
                leaf = row[0] if row else None
            if leaf is None:
                return []
            return db.execute(f"""
                WITH RECURSIVE path(id, depth) AS (
                    SELECT ?, 0
                    UNION ALL
                    SELECT i.parent_id, path.depth + 1 FROM items i JOIN path ON i.id = path.id
                    WHERE i.conversation_id = ? AND i.parent_id IS NOT NULL)
                SELECT {columns} FROM path JOIN items i ON i.id = path.id
                WHERE i.conversation_id = ? ORDER BY path.depth DESC""",
                              (leaf, conversation_id, conversation_id)).fetchall()

    def branch_page(self, conversation_id: str, limit: int, newest_first: bool, after: str | None = None
                    ) -> tuple[list[dict], bool]:
        """One page of the current branch's items (a list endpoint's): `limit` items from the one after `after`,
        oldest or newest first, and whether more follow. The walk reads only ids; bodies only for the page. KeyError
        when `after` is not an item of the branch."""
        with self._snapshot() as db:
            ids = [item_id for item_id, in self._branch(conversation_id, db=db, columns="i.id")]
            if newest_first:
                ids.reverse()
            if after is not None:
                if after not in ids:
                    raise KeyError(after)
                ids = ids[ids.index(after) + 1:]
            page = ids[:limit]
            bodies = dict(db.execute(f"SELECT id, body FROM items WHERE id IN ({', '.join('?' * len(page))})",
                                     page).fetchall())
        return [json.loads(bodies[i]) for i in page], len(ids) > limit

    def items(self, conversation_id: str, leaf=CURRENT) -> list[dict]:
        """The items of the conversation's current branch (or of the branch ending at `leaf`), first to last (the
        caller checked the owner)."""
        return [json.loads(b) for b, _, _, _ in self._branch(conversation_id, leaf)]

    def items_with_tokens(self, conversation_id: str, leaf=CURRENT) -> list[tuple[dict, list[int]]]:
        return [(json.loads(b), unpack_ids(t)) for b, t, _, _ in self._branch(conversation_id, leaf)]

    def context_items(self, conversation_id: str, leaf=CURRENT) -> list[tuple[dict, list[int], str | None]]:
        """(item, token ids, sha256 of their tokenizer or None before schema v3) of each item of the current branch
        (or of the branch ending at `leaf`), in order: what the context of a turn continuing it is made of, and what
        to render it from again under another tokenizer."""
        return [(json.loads(b), unpack_ids(t), h) for b, t, h, _ in self._branch(conversation_id, leaf)]

    def tree(self, conversation_id: str) -> dict:
        """Every item of the conversation, all branches, in the order they were added: {"current_item": the end of
        the current branch, "items": [(item, parent id or None)]}."""
        with self._snapshot() as db:
            row = db.execute("SELECT current_item FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            rows = db.execute("SELECT body, parent_id FROM items WHERE conversation_id = ? ORDER BY position",
                              (conversation_id,)).fetchall()
        return {"current_item": row[0] if row else None, "items": [(json.loads(b), p) for b, p in rows]}

    @staticmethod
    def _latest_leaf(db, conversation_id: str, item_id: str) -> str:
        """The end of the most recently extended branch through `item_id`: its newest child, that one's, ..."""
        while True:
            child = db.execute("SELECT id FROM items WHERE conversation_id = ? AND parent_id = ? "
                               "ORDER BY position DESC LIMIT 1", (conversation_id, item_id)).fetchone()
            if child is None:
                return item_id
            item_id = child[0]

    def show_branch(self, owner: str, conversation_id: str, item_id: str) -> str | None:
        """Make the branch through `item_id` the current one (down to its most recently extended end); returns that
        end, or None when the conversation or the item does not exist."""
        with self.transaction() as db:
            if not db.execute("SELECT 1 FROM items i JOIN conversations c ON c.id = i.conversation_id "
                              "WHERE i.id = ? AND c.id = ? AND c.owner = ?",
                              (item_id, conversation_id, owner)).fetchone():
                return None
            leaf = self._latest_leaf(db, conversation_id, item_id)
            db.execute("UPDATE conversations SET current_item = ? WHERE id = ?", (leaf, conversation_id))
        return leaf

    def get_item(self, conversation_id: str, item_id: str) -> dict | None:
        rows = self._read("SELECT body FROM items WHERE conversation_id = ? AND id = ?", (conversation_id, item_id))
        return json.loads(rows[0][0]) if rows else None

    def parent_of(self, conversation_id: str, item_id: str) -> tuple[bool, str | None]:
        """(whether the item exists, its parent's id or None)."""
        rows = self._read("SELECT parent_id FROM items WHERE conversation_id = ? AND id = ?",
                          (conversation_id, item_id))
        return (True, rows[0][0]) if rows else (False, None)

    def delete_item(self, conversation_id: str, item_id: str) -> bool:
        """Delete one item, as OpenAI's API does: what followed it now follows its parent."""
        with self.transaction() as db:
            row = db.execute("SELECT parent_id FROM items WHERE conversation_id = ? AND id = ?",
                             (conversation_id, item_id)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE items SET parent_id = ? WHERE conversation_id = ? AND parent_id = ?",
                       (row[0], conversation_id, item_id))
            db.execute("UPDATE conversations SET current_item = ? WHERE id = ? AND current_item = ?",
                       (row[0], conversation_id, item_id))
            db.execute("DELETE FROM items WHERE conversation_id = ? AND id = ?", (conversation_id, item_id))
        return True

    def delete_branch(self, conversation_id: str, item_id: str) -> bool:
        """Delete an item and everything that follows it in any branch. When the current branch went with it, the
        current one becomes the newest remaining sibling's (or else ends at the parent)."""
        with self.transaction() as db:
            row = db.execute("SELECT parent_id FROM items WHERE conversation_id = ? AND id = ?",
                             (conversation_id, item_id)).fetchone()
            if row is None:
                return False
            doomed = [r[0] for r in db.execute("""
                WITH RECURSIVE sub(id) AS (SELECT ? UNION ALL
                    SELECT i.id FROM items i JOIN sub ON i.parent_id = sub.id WHERE i.conversation_id = ?)
                SELECT id FROM sub""", (item_id, conversation_id))]
            current = db.execute("SELECT current_item FROM conversations WHERE id = ?",
                                 (conversation_id,)).fetchone()[0]
            db.executemany("DELETE FROM items WHERE conversation_id = ? AND id = ?",
                           [(conversation_id, i) for i in doomed])
            if current in doomed:
                parent = row[0]
                sibling = db.execute("SELECT id FROM items WHERE conversation_id = ? AND parent_id IS ? "
                                     "ORDER BY position DESC LIMIT 1", (conversation_id, parent)).fetchone()
                current = self._latest_leaf(db, conversation_id, sibling[0]) if sibling else parent
                db.execute("UPDATE conversations SET current_item = ? WHERE id = ?", (current, conversation_id))
        return True

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
                          items: list[tuple[dict, list[int]]], tokenizer: str | None = None,
                          other_replies: list[tuple[dict, list[int]]] = ()) -> None:
        """One transaction: the ranking of a compare task and the turn it adds to its conversation's current branch
        (`items`: the input items and the chosen reply; `other_replies`: the other candidates, kept as the chosen
        reply's siblings; ids of the tokenizer whose sha256 is `tokenizer`). KeyError if the conversation is gone,
        StoreError if it changed since the candidates were sampled or was ranked."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM rankings WHERE task_id = ?", (task["id"],)).fetchone():
                raise StoreError("this comparison was ranked already")
            if not db.execute("SELECT 1 FROM conversations WHERE id = ? AND owner = ?",
                              (task["conversation_id"], owner)).fetchone():
                raise KeyError(task["conversation_id"])
            tokens = [t for _, ids, _, _ in self._branch(task["conversation_id"], db=db) for t in unpack_ids(ids)]
            if context_digest(tokens) != task["params"]["context_digest"]:
                raise StoreError("the conversation changed after these candidates were generated; compare again")
            db.execute("INSERT INTO rankings VALUES (?, ?, ?, ?)",
                       (task["id"], labeller, json.dumps(ranking), time.time()))
            *inputs, chosen = items
            self._append_items(db, owner, task["conversation_id"], inputs, tokenizer)
            prompt_end = db.execute("SELECT current_item FROM conversations WHERE id = ?",
                                    (task["conversation_id"],)).fetchone()[0]
            for reply in [*other_replies, chosen]:
                self._append_items(db, owner, task["conversation_id"], [reply], tokenizer, after=prompt_end)

    def rank_siblings(self, owner: str, conversation_id: str, parent_id: str, labeller: str, ranking: list[str],
                      prompt: list[dict], new_id) -> str:
        """Store `labeller`'s ranking of the replies that follow `parent_id` (a task of kind 'siblings', one per
        parent: its candidates are every reply ranked so far, each labeller's latest ranking kept); returns the
        task's id. `prompt`: the messages the replies answer. KeyError when a ranked item is not a reply there."""
        with self.transaction() as db:
            replies = {r[0]: json.loads(r[1]) for r in db.execute(
                "SELECT id, body FROM items WHERE conversation_id = ? AND parent_id = ?", (conversation_id, parent_id))}
            missing = [i for i in ranking if i not in replies]
            if missing:
                raise KeyError(missing[0])
            texts = {i: item_text(replies[i]) for i in ranking}
            row = db.execute("SELECT id, candidates FROM tasks WHERE kind = 'siblings' AND owner = ? "
                             "AND conversation_id = ? AND json_extract(params, '$.parent_item') = ?",
                             (owner, conversation_id, parent_id)).fetchone()
            if row is None:
                task_id = new_id()
                self._insert_task(db, {"id": task_id, "kind": "siblings", "owner": owner,
                                       "conversation_id": conversation_id, "prompt": prompt,
                                       "candidates": [{"id": i, "text": texts[i]} for i in ranking],
                                       "params": {"parent_item": parent_id}})
            else:
                task_id, candidates = row[0], json.loads(row[1])
                known = {c["id"] for c in candidates}
                candidates += [{"id": i, "text": texts[i]} for i in ranking if i not in known]
                db.execute("UPDATE tasks SET candidates = ? WHERE id = ?", (json.dumps(candidates), task_id))
            db.execute("INSERT OR REPLACE INTO rankings VALUES (?, ?, ?, ?)",
                       (task_id, labeller, json.dumps(ranking), time.time()))
        return task_id

    def rankings(self, kind: str | None = None) -> list[dict]:
        """{"task_id", "labeller", "ranking", "created_at"} of every ranking (of `kind` tasks), oldest first."""
        join = "JOIN tasks t ON t.id = r.task_id WHERE t.kind = ?" if kind else ""
        rows = self._read(f"SELECT r.task_id, r.labeller, r.ranking, r.created_at FROM rankings r {join} "
                          f"ORDER BY r.created_at, r.rowid", (kind,) if kind else ())
        return [{"task_id": t, "labeller": lab, "ranking": json.loads(rk), "created_at": c} for t, lab, rk, c in rows]


def item_text(item: dict) -> str:
    """A message item's text (its text parts, or its refusal)."""
    return "".join(part.get("text", "") or part.get("refusal", "") for part in item.get("content", []))


def context_digest(tokens: list[int]) -> str:
    """A short fingerprint of a conversation's token ids (a comparison checks the conversation did not change)."""
    return hashlib.sha256(pack_ids(tokens)).hexdigest()[:32]
