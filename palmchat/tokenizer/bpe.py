"""Byte-level BPE tokenizer (HF ``tokenizers``) with a chat format.

Special tokens have fixed ids::

    <|pad|>=0  <|endoftext|>=1  <|system|>=2  <|user|>=3  <|assistant|>=4  <|end|>=5

A conversation is rendered as::

    [bos] + for each message: [role_id] + encode(content) + [eot]

where ``bos`` is ``<|endoftext|>`` and ``eot`` is ``<|end|>``.  Each message's
content is encoded independently, so rendering is prefix-stable: appending a
turn never changes the ids of earlier turns (the server relies on this for
prefix KV-cache reuse).

Security: :meth:`Tokenizer.encode` never produces special-token ids, even if
the text contains literal strings such as ``"<|end|>"``; those are encoded as
ordinary byte-level tokens.  Special ids only enter a sequence through the
chat-format helpers.

This module deliberately does not import torch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from palmchat.utils.atomic import atomic_write

__all__ = [
    "PAD_TOKEN",
    "BOS_TOKEN",
    "SYSTEM_TOKEN",
    "USER_TOKEN",
    "ASSISTANT_TOKEN",
    "EOT_TOKEN",
    "SPECIAL_TOKENS",
    "PAD_ID",
    "BOS_ID",
    "SYSTEM_ID",
    "USER_ID",
    "ASSISTANT_ID",
    "EOT_ID",
    "ROLES",
    "TOKENIZER_FILENAME",
    "Tokenizer",
    "train_tokenizer",
]

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|endoftext|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
EOT_TOKEN = "<|end|>"

# Order defines the ids: index in this tuple == token id.
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    BOS_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
    EOT_TOKEN,
)
PAD_ID, BOS_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, EOT_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)

ROLES: dict[str, int] = {"system": SYSTEM_ID, "user": USER_ID, "assistant": ASSISTANT_ID}

TOKENIZER_FILENAME = "tokenizer.json"

# 256 byte-level symbols + the special tokens.
MIN_VOCAB_SIZE = 256 + NUM_SPECIAL_TOKENS


def _resolve_path(path: str | os.PathLike) -> Path:
    """A directory means ``<dir>/tokenizer.json``."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILENAME
    return p


class Tokenizer:
    """Thin wrapper around :class:`tokenizers.Tokenizer` with the chat format."""

    pad_id = PAD_ID
    bos_id = BOS_ID
    eot_id = EOT_ID
    system_id = SYSTEM_ID
    user_id = USER_ID
    assistant_id = ASSISTANT_ID

    def __init__(self, hf_tokenizer: _HFTokenizer, path: str | None = None):
        for expected_id, tok in enumerate(SPECIAL_TOKENS):
            got = hf_tokenizer.token_to_id(tok)
            if got != expected_id:
                raise ValueError(
                    f"tokenizer special token {tok!r} has id {got}, expected {expected_id}"
                )
        # Never turn literal "<|end|>" etc. in text into special ids: user text
        # must not be able to inject turn boundaries.  (This flag is not
        # serialized by `tokenizers`, so it is (re)set on every construction.)
        hf_tokenizer.encode_special_tokens = True
        self._tok = hf_tokenizer
        self.path = path

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def hf_tokenizer(self) -> _HFTokenizer:
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Encode plain text; never emits special-token ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if not text:
            return []
        ids = self._tok.encode(text, add_special_tokens=False).ids
        self._check_no_special(ids)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in Rust); never emits special ids."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: item {i} is {type(t).__name__}, expected str")
        if not texts:
            return []
        out = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        for ids in out:
            self._check_no_special(ids)
        return out

    @staticmethod
    def _check_no_special(ids: list[int]) -> None:
        # Defence in depth: special ids are 0..NUM_SPECIAL_TOKENS-1.
        if ids and min(ids) < NUM_SPECIAL_TOKENS:
            raise RuntimeError("tokenizer produced a special-token id from plain text")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_str(self) -> str:
        return self._tok.to_str()

    @property
    def sha256(self) -> str:
        """Content hash of the serialized tokenizer (to tie data shards to it)."""
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    # ------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> str:
        """Atomically write ``tokenizer.json`` (a directory means ``dir/tokenizer.json``).

        Returns the file path written.
        """
        p = _resolve_path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, self._tok.to_str(pretty=True))
        self.path = str(p)
        return str(p)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        p = _resolve_path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
            hf = _HFTokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - re-raised as a one-line ValueError
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"invalid tokenizer file {p}: {msg}") from None
        try:
            return cls(hf, path=str(p))
        except ValueError as e:
            raise ValueError(f"invalid tokenizer file {p}: {e}") from None

    # ------------------------------------------------------------- chat format
    def render_turn(self, message: Mapping, index: int = 0) -> list[int]:
        """``[role_id] + encode(content) + [eot]`` for one message."""
        role, content = _validate_message(message, index)
        return [ROLES[role]] + self.encode(content) + [EOT_ID]

    def render_conversation(
        self, messages: Sequence[Mapping], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Render a conversation to ``(ids, loss_mask)``.

        ``loss_mask`` is 1 exactly on assistant content tokens and their closing
        eot, 0 elsewhere.  With ``add_generation_prompt`` an ``<|assistant|>``
        token (mask 0) is appended as the prompt for the model's reply.
        """
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError(
                f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
            )
        if len(messages) == 0:
            raise ValueError("messages: conversation is empty (need at least one message)")
        validated = [_validate_message(m, i) for i, m in enumerate(messages)]
        contents = self.encode_batch([c for _, c in validated])

        ids: list[int] = [BOS_ID]
        mask: list[int] = [0]
        for (role, _), body in zip(validated, contents):
            ids.append(ROLES[role])
            mask.append(0)
            ids.extend(body)
            ids.append(EOT_ID)
            m = 1 if role == "assistant" else 0
            mask.extend([m] * (len(body) + 1))
        if add_generation_prompt:
            ids.append(ASSISTANT_ID)
            mask.append(0)
        return ids, mask

    def render_prompt(self, messages: Sequence[Mapping]) -> list[int]:
        """Ids of ``messages`` followed by the assistant generation prompt."""
        return self.render_conversation(messages, add_generation_prompt=True)[0]

    @property
    def reply_stop_ids(self) -> tuple[int, ...]:
        """What ends a sampled reply: its end-of-turn, or any other special token (a role token would open the next
        message, bos a new document), so that a stored conversation always keeps the shape rendered above."""
        return (EOT_ID, BOS_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, PAD_ID)

    def message_starts(self, ids: Sequence[int]) -> list[tuple[str, int]]:
        """(role, index) of each message that starts in ``ids`` (a rendering as above, possibly ending with the
        generation prompt, which counts as an assistant message): role ids only ever open a message."""
        role_of = {i: role for role, i in ROLES.items()}
        return [(role_of[t], i) for i, t in enumerate(ids) if t in role_of]

    def decode_reply(self, ids: Iterable[int]) -> str:
        """Decode generated reply ids, stopping at the first eot (exclusive)."""
        out: list[int] = []
        for i in ids:
            i = int(i)
            if i == EOT_ID:
                break
            out.append(i)
        return self.decode(out, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def _validate_message(message: object, index: int) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise ValueError(
            f"message {index}: expected a dict with 'role' and 'content', got {type(message).__name__}"
        )
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(
            f"message {index}: unknown role {role!r} (expected one of {', '.join(ROLES)})"
        )
    if "content" not in message:
        raise ValueError(f"message {index}: missing 'content'")
    content = message["content"]
    if not isinstance(content, str):
        raise ValueError(
            f"message {index}: 'content' must be a string, got {type(content).__name__}"
        )
    return role, content


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``.

    Every byte is encodable (initial alphabet = the 256 byte-level symbols).
    Raises ValueError on an empty corpus (no non-empty strings).
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 bytes + "
            f"{NUM_SPECIAL_TOKENS} special tokens), got {vocab_size!r}"
        )
    if isinstance(texts, str):
        raise ValueError("train_tokenizer expects an iterable of strings, not a single string")

    hf = _HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    count = 0

    def _iter() -> Iterator[str]:
        nonlocal count
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"train_tokenizer: text {i} is {type(t).__name__}, expected str")
            if t:
                count += 1
                yield t

    hf.train_from_iterator(_iter(), trainer=trainer)
    if count == 0:
        raise ValueError("train_tokenizer: corpus is empty (no non-empty texts)")
    return Tokenizer(hf)
