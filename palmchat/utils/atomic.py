"""Atomic file writes: a crash at any moment leaves either the old file or the new one, never half of one.

Write a temporary file in the target's folder, fsync it, then os.replace it over the target.
Standard library only, so the tokenizer and data modules can use it without importing torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# mkstemp creates files 0600; these are ordinary outputs that others may read. (Reading os.umask would
# mean changing it, process-wide.)
FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` for a writer that takes a file name (safetensors, savefig);
    on success the file is fsynced and renamed over `path`, on error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
