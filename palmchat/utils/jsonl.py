"""JSON Lines files: one reader that names FILE:LINE in every error, one atomic writer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from palmchat.utils.atomic import atomic_write


class DataError(ValueError):
    """A data file is missing, empty or holds a malformed record (message: ``FILE:LINE: PROBLEM``)."""


class RecordError(Exception):
    """A problem with one record, raised by a record parser; read_records turns it into a DataError with
    FILE:LINE."""


def json_type(value: object) -> str:
    """JSON name of a Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def iter_records(path: str | os.PathLike, on_bad: Callable[[str, int, str], None] | None = None
                 ) -> Iterator[tuple[str, int, dict]]:
    """Yield ``(file name, line number, record)`` for each non-blank line of a JSONL file. A line that is not a JSON
    object is a DataError, or with ``on_bad`` is passed to it as ``("FILE:LINE", line number, problem)`` and
    skipped."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}" if not p.exists() else f"not a file: {p}")
    name = str(path)
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                record, problem = None, f"not valid UTF-8 (byte {e.start + 1})"
            else:
                if lineno == 1:
                    line = line.lstrip("\ufeff")  # tolerate a byte-order mark
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    problem = "" if isinstance(record, dict) else f"expected a JSON object, got {json_type(record)}"
                except json.JSONDecodeError as e:
                    record, problem = None, f"invalid JSON ({e.msg} at column {e.colno})"
            if problem:
                if on_bad is None:
                    raise DataError(f"{name}:{lineno}: {problem}")
                on_bad(f"{name}:{lineno}", lineno, problem)
                continue
            yield name, lineno, record


def read_records(path, parse) -> list:
    """``parse(record)`` for each record of a JSONL file; a RecordError it raises becomes a DataError naming
    FILE:LINE, and a file without records is a DataError too."""
    return parse_records(path, ((f"{name}:{lineno}", record) for name, lineno, record in iter_records(path)), parse)


def parse_records(path, rows, parse) -> list:
    """``parse(record)`` for each ``(where, record)`` of `rows` (read from `path`); a RecordError it raises becomes
    a DataError naming ``where``, and no records at all is a DataError naming `path`."""
    out = []
    for where, record in rows:
        try:
            out.append(parse(record))
        except RecordError as e:
            raise DataError(f"{where}: {e}") from None
    if not out:
        raise DataError(f"{path}: no records")
    return out


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of a JSONL file (none for an empty one)."""
    return [record for _, _, record in iter_records(path)]


def jsonl_text(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write records atomically, one JSON object per line, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, jsonl_text(records))
    return path
