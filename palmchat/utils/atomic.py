"""Atomic file writes: a crash at any moment leaves either the old file or the new one, never half of one.

Write a temporary file in the target's folder, fsync it, then os.replace it over the target.
Standard library only, so the tokenizer and data modules can use it without importing torch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside `path` to fill; on success its files (in subfolders too) are fsynced and it
    is renamed to `path` (replacing an older one), on error it is removed."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        tmp.chmod(0o755)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def point_latest(run_dir: str | os.PathLike, name: str, keep_last: int) -> None:
    """Atomically make run_dir/latest name the folder `name`, then remove all but the newest `keep_last`
    step-* folders."""
    run_dir = Path(run_dir)
    atomic_write(run_dir / "latest", name + "\n")
    old = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and p.name != name)
    for stale in old[: max(0, len(old) - (keep_last - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
