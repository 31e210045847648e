"""Text/JSONL corpora -> token shards on disk -> packed fixed-length batches.

Layout written by :func:`write_shards` in ``out_dir``::

    train.bin   flat token ids (uint16 if vocab < 65536 else uint32)
    val.bin     held-out documents, same format
    meta.json   dtype, token/doc counts, vocab size, tokenizer hash

Each document is stored as ``[bos_id] + tokenizer.encode(doc)``.  Documents are
assigned to train/val by a hash of ``(seed, document text)``: the split does not
depend on document order, and duplicate documents always land in the same split.

:class:`PackedBatches` draws random ``seq_len + 1`` windows (packing across
document boundaries, nanoGPT-style).  The randomness of ``get_batch(step)`` is
a pure function of ``(seed, step)``, so a run resumed at step ``k`` sees exactly
the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from palmchat.utils.atomic import atomic_write

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "read_documents",
    "write_shards",
    "load_meta",
    "shard_dtype",
    "TokenShard",
    "PackedBatches",
]

SUPPORTED_EXTENSIONS = (".txt", ".jsonl")
META_FILENAME = "meta.json"
FORMAT_VERSION = 1
_ENCODE_CHUNK = 512  # documents per encode_batch call


# --------------------------------------------------------------------------- reading
def _expand_paths(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = sorted(
                f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUPPORTED_EXTENSIONS
            )
            if not files:
                raise ValueError(
                    f"data directory {p} contains no {' or '.join(SUPPORTED_EXTENSIONS)} files"
                )
            out.extend(files)
            continue
        if not p.exists():
            raise FileNotFoundError(f"data file not found: {p}")
        if p.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise ValueError(
                f"unsupported data file extension {p.suffix or '(none)'!r} for {p} "
                f"(expected {' or '.join(SUPPORTED_EXTENSIONS)})"
            )
        out.append(p)
    if not out:
        raise ValueError("no data files given")
    return out


def _iter_txt(path: Path) -> Iterator[str]:
    """Documents separated by one or more blank (whitespace-only) lines."""
    lines: list[str] = []
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):  # noqa: B007 (the except clause reports it)
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).rstrip("\r\n")
                    lines = []
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: line {lineno + 1}: not valid UTF-8 ({e.reason})") from None
    if lines:
        yield "".join(lines).rstrip("\r\n")


def _iter_jsonl(path: Path) -> Iterator[str]:
    """One JSON object per line with a string ``"text"`` field; blank lines skipped."""
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(
                        f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}"
                    )
                if "text" not in obj:
                    raise ValueError(f"{path}: line {lineno}: missing \"text\" field")
                text = obj["text"]
                if not isinstance(text, str):
                    raise ValueError(
                        f"{path}: line {lineno}: \"text\" must be a string, got {type(text).__name__}"
                    )
                if text:
                    yield text
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: line {lineno + 1}: not valid UTF-8 ({e.reason})") from None


def read_documents(paths) -> Iterator[str]:
    """Yield documents from ``.txt`` / ``.jsonl`` files (or directories of them).

    Paths are validated eagerly (missing file / unsupported extension raise at
    call time); content errors are raised while iterating, naming file and line.
    Raises ValueError if the whole corpus yields no document.
    """
    files = _expand_paths(paths)

    def gen() -> Iterator[str]:
        n = 0
        for p in files:
            it = _iter_jsonl(p) if p.suffix.lower() == ".jsonl" else _iter_txt(p)
            for doc in it:
                n += 1
                yield doc
        if n == 0:
            names = ", ".join(str(p) for p in files)
            raise ValueError(f"corpus ({names}) contains no documents")

    return gen()


# --------------------------------------------------------------------------- writing
def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


def _split_score(seed: int, doc: str) -> float:
    """Deterministic pseudo-uniform number in [0, 1) from (seed, doc)."""
    h = hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8,
                        key=str(int(seed)).encode())
    return int.from_bytes(h.digest(), "little") / 2.0**64



def _unlink_quiet(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class _SplitWriter:
    """Appends documents to a temp file, remembering one extreme doc for rebalancing."""

    def __init__(self, path: Path, dtype: np.dtype, keep_min: bool):
        self.final_path = path
        fd, self.tmp_path = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        self.f = os.fdopen(fd, "wb")
        self.dtype = dtype
        self.keep_min = keep_min
        self.tokens = 0
        self.docs = 0
        self.extreme: tuple[float, int, int] | None = None  # (score, offset, length)

    def add(self, ids: np.ndarray, score: float) -> None:
        if self.extreme is None or (score < self.extreme[0] if self.keep_min else score > self.extreme[0]):
            self.extreme = (score, self.tokens, len(ids))
        ids.astype(self.dtype, copy=False).tofile(self.f)
        self.tokens += len(ids)
        self.docs += 1

    def pop_extreme(self) -> np.ndarray:
        """Remove the remembered document from the file and return its tokens."""
        assert self.extreme is not None
        _, off, length = self.extreme
        self.f.flush()
        data = np.fromfile(self.tmp_path, dtype=self.dtype)
        doc = data[off:off + length].copy()
        rest = np.concatenate([data[:off], data[off + length:]])
        self.f.close()
        self.f = open(self.tmp_path, "wb")  # noqa: SIM115 (held open until finish())
        rest.tofile(self.f)
        self.tokens -= length
        self.docs -= 1
        self.extreme = None
        return doc

    def finish(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp_path, self.final_path)

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            _unlink_quiet(self.tmp_path)


def write_shards(documents: Iterable[str], tokenizer, out_dir, val_fraction: float = 0.05,
                 seed: int = 0) -> dict:
    """Tokenize ``documents`` into ``out_dir/{train,val}.bin`` + ``meta.json``.

    Each document becomes ``[bos_id] + tokenizer.encode(doc)``.  A document goes
    to val iff ``hash(seed, doc) < val_fraction``.  If ``val_fraction > 0`` and
    there are >= 2 documents, both splits are guaranteed non-empty (the most
    val-like train document is moved, or vice versa).  Returns the metadata dict.
    """
    if not (0.0 <= float(val_fraction) < 1.0):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(documents, str):
        raise ValueError("write_shards expects an iterable of documents, not a single string")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = int(tokenizer.vocab_size)
    dtype = shard_dtype(vocab_size)
    bos = tokenizer.chat_format.bos_id
    if bos is None:
        raise ValueError("pretraining shards start each document with the tokenizer's bos token, and this tokenizer's "
                         "chat format has none")

    train = _SplitWriter(out / "train.bin", dtype, keep_min=True)   # min score = most val-like
    val = _SplitWriter(out / "val.bin", dtype, keep_min=False)      # max score = most train-like
    try:
        chunk: list[str] = []

        def flush() -> None:
            for doc, ids in zip(chunk, tokenizer.encode_batch(chunk)):
                arr = np.empty(len(ids) + 1, dtype=np.int64)
                arr[0] = bos
                arr[1:] = ids
                score = _split_score(seed, doc)
                (val if score < val_fraction else train).add(arr, score)
            chunk.clear()

        for i, doc in enumerate(documents):
            if not isinstance(doc, str):
                raise TypeError(f"write_shards: document {i} is {type(doc).__name__}, expected str")
            chunk.append(doc)
            if len(chunk) >= _ENCODE_CHUNK:
                flush()
        if chunk:
            flush()

        n_docs = train.docs + val.docs
        if n_docs == 0:
            raise ValueError("write_shards: no documents to write (empty corpus)")
        if val_fraction > 0 and n_docs >= 2:
            if val.docs == 0:
                moved = train.pop_extreme()
                val.add(moved, 0.0)
            elif train.docs == 0:
                moved = val.pop_extreme()
                train.add(moved, 1.0)

        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "bos_id": bos,
            "tokenizer_sha256": getattr(tokenizer, "sha256", None),
            "tokenizer_path": getattr(tokenizer, "path", None),
            "val_fraction": float(val_fraction),
            "seed": int(seed),
            "train_tokens": train.tokens,
            "val_tokens": val.tokens,
            "train_docs": train.docs,
            "val_docs": val.docs,
        }
        train.finish()
        val.finish()
    except BaseException:
        train.abort()
        val.abort()
        raise
    atomic_write(out / META_FILENAME, json.dumps(meta, indent=2) + "\n")
    return meta


def load_meta(shard_dir) -> dict:
    p = Path(shard_dir) / META_FILENAME
    if not p.is_file():
        raise FileNotFoundError(f"shard metadata not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid shard metadata {p}: {e.msg} (line {e.lineno})") from None


# --------------------------------------------------------------------------- reading shards
class TokenShard:
    """Read-only memmap over a ``.bin`` token file.

    ``dtype`` defaults to the one recorded in ``meta.json`` next to the file.
    """

    def __init__(self, path, dtype=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"token shard not found: {self.path}")
        if dtype is None:
            dtype = load_meta(self.path.parent)["dtype"]
        self.dtype = np.dtype(dtype)
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(
                f"token shard {self.path}: size {size} bytes is not a multiple of "
                f"{self.dtype.itemsize} ({self.dtype.name}); wrong dtype or truncated file"
            )
        if size == 0:
            self.tokens = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_tokens(self) -> int:
        return len(self)


def _step_seed(seed: int, step: int) -> int:
    h = hashlib.blake2b(f"{int(seed)}:{int(step)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class PackedBatches:
    """Fixed-length training batches from a token shard.

    ``get_batch(step)`` returns ``(x, y)`` int64 tensors of shape ``(B, T)`` with
    ``y = x`` shifted by one; window starts are drawn with a generator seeded by
    a hash of ``(seed, step)`` only.
    """

    def __init__(self, path, seq_len: int, batch_size: int, seed: int = 0, dtype=None):
        if int(seq_len) < 1 or int(batch_size) < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        self.shard = path if isinstance(path, TokenShard) else TokenShard(path, dtype=dtype)
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        n = len(self.shard)
        if n < self.seq_len + 1:
            raise ValueError(
                f"token shard {self.shard.path} has {n} tokens, but seq_len={self.seq_len} "
                f"needs at least {self.seq_len + 1}"
            )

    @property
    def path(self) -> Path:
        return self.shard.path

    def _gather(self, starts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        data = self.shard.tokens
        buf = np.stack([np.asarray(data[s:s + T + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(_step_seed(self.seed, step))
        high = len(self.shard) - self.seq_len  # start s needs s + T + 1 <= n
        starts = torch.randint(0, high, (self.batch_size,), generator=g).tolist()
        return self._gather(starts)

    def num_eval_windows(self) -> int:
        return (len(self.shard) - 1) // self.seq_len

    def iter_eval_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic, non-overlapping windows (targets cover disjoint tokens).

        Window ``i`` is tokens ``[i*T, i*T + T + 1)``; windows are grouped into
        batches of ``batch_size`` (the last one may be smaller).
        """
        T, B = self.seq_len, self.batch_size
        n_win = self.num_eval_windows()
        for batches, first in enumerate(range(0, n_win, B)):
            if max_batches is not None and batches >= max_batches:
                return
            starts = [w * T for w in range(first, min(first + B, n_win))]
            yield self._gather(starts)
