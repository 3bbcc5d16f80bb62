"""Atomic publication of files and directories: write under a temporary sibling name, make it
durable, then rename it into place, so a crash or a full disk never leaves a half-written result
under the final name (readers see the old version or the new one, nothing in between).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to create (a file or a directory); on success it replaces ``path``.

    A file is fsynced before the rename, a directory's files must be fsynced by the writer (see
    :func:`fsync_file`); the parent directory is fsynced after it. On an exception the temporary is
    removed and ``path`` is untouched; the temporary name (``.tmp-NAME-PID``) is unique per process and
    cleared by the next write of the same path.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            fsync_file(tmp)
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except Exception:  # an ordinary failure (e.g. a full disk); a killed process leaves debris for the next save to clear
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


__all__ = ["atomic_path", "fsync_dir", "fsync_file"]
