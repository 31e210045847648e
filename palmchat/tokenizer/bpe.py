"""Byte-level BPE tokenizer (HF ``tokenizers``) whose vocabulary holds palmchat's special tokens.

The special tokens and their fixed ids are those of palmchat's chat format
(:mod:`palmchat.tokenizer.chat_format`); ``Tokenizer.chat_format`` renders
conversations with them.

Security: :meth:`Tokenizer.encode` never produces special-token ids, even if
the text contains literal strings such as ``"<|end|>"``; those are encoded as
ordinary byte-level tokens.  Special ids only enter a sequence through the
chat format.

This module deliberately does not import torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from palmchat.tokenizer.chat_format import (
    BOS_TOKEN,
    EOT_TOKEN,
    NUM_SPECIAL_TOKENS,
    PAD_TOKEN,
    PALMCHAT_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    PalmChatFormat,
)
from palmchat.utils.atomic import atomic_write

__all__ = [
    "TOKENIZER_FILENAME",
    "Tokenizer",
    "train_tokenizer",
]

TOKENIZER_FILENAME = "tokenizer.json"

# 256 byte-level symbols + the special tokens.
MIN_VOCAB_SIZE = 256 + NUM_SPECIAL_TOKENS


SPECIAL_IDS = frozenset(range(NUM_SPECIAL_TOKENS))


def encode_plain(tok: _HFTokenizer, texts: Sequence[str], special_ids: frozenset[int]) -> list[list[int]]:
    """Plain texts -> their ids through `tok` (parallel in Rust), with no special tokens added. None of
    `special_ids` may come out (defence in depth: `tok` is set to encode special tokens' text as plain text)."""
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"encode_batch: item {i} is {type(t).__name__}, expected str")
    out = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)] if texts else []
    if any(not special_ids.isdisjoint(ids) for ids in out):  # a set test per text, not a Python loop per token
        raise RuntimeError("tokenizer produced a special-token id from plain text")
    return out


def _resolve_path(path: str | os.PathLike) -> Path:
    """A directory means ``<dir>/tokenizer.json``."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILENAME
    return p


class Tokenizer:
    """Thin wrapper around :class:`tokenizers.Tokenizer`; ``chat_format`` is palmchat's chat format on top of it."""

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
        self.chat_format = PalmChatFormat(self)

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
        return encode_plain(self._tok, [text], SPECIAL_IDS)[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in Rust); never emits special ids."""
        return encode_plain(self._tok, texts, SPECIAL_IDS)

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
        """Content hash of the serialized tokenizer: its identity. Data shards, checkpoints (config.json) and the
        server's stored token ids record it, so that ids are never read with another tokenizer."""
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

    def save_pretrained(self, folder: str | os.PathLike) -> str:
        """Write ``folder`` as a Hugging Face tokenizer folder that ``transformers.AutoTokenizer`` reads, its chat
        template rendering palmchat's format (the same ids as ``chat_format.render``); returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / TOKENIZER_FILENAME, self._tok.to_str(pretty=True))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOT_TOKEN,
                  "pad_token": PAD_TOKEN, "add_bos_token": False, "clean_up_tokenization_spaces": False,
                  "chat_template": PALMCHAT_CHAT_TEMPLATE}
        atomic_write(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return str(folder)

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

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


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
