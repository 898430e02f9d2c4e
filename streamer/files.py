"""Crash-safe file operations: a file is either absent or complete, never half written under its final name."""

from __future__ import annotations

import errno
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import LayerpressError


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename over `path`, fsync the directory."""
    atomic_write_parts(path, [data])


def atomic_write_parts(path: Path, parts: Iterable[bytes | memoryview]) -> str:
    """`atomic_write` of data given in parts, written as they come and never joined (a block's gradient norms are
    4 GB at OPT-66B width: joined, they would be in memory twice); returns the data's sha256."""
    temporary = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    with guard_disk(path):
        with open(temporary, "wb") as handle:
            for part in parts:
                digest.update(part)
                handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)
    return digest.hexdigest()


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
