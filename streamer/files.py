"""Crash-safe file operations: a file is either absent or complete, never half written under its final name."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import LayerpressError


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename over `path`, fsync the directory."""
    temporary = path.with_name(path.name + ".tmp")
    with guard_disk(path):
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)


@contextmanager
def guard_disk(path: Path) -> Iterator[None]:
    """Turn OS write errors into one clear line; a full disk says that the run resumes once space is freed."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise LayerpressError(
                f"disk full while writing {path}: free space and run the same command again to resume"
            ) from exc
        raise LayerpressError(f"cannot write {path}: {exc.strerror or exc}") from exc
