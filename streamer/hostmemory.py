"""Give freed block memory back to the operating system, so that host memory follows one block, not the model.

glibc serves an allocation below its mmap threshold from a heap arena and keeps it there when freed; the threshold
rises (up to 32 MiB) each time a larger mapped chunk is freed. Tensors of a block's size then come from arenas (one
per thread: the main loop, the reader and the writer), and freed blocks stay in them: the resident size of a compress
grew with depth (measured on a random Llama of width 1024, wanda: 746 MiB at 4 blocks, 1060 MiB at 16). Trimming the
arenas once a block is released returns that memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only


def trim() -> None:
    """Return the free memory of every malloc arena to the operating system (no-op where malloc cannot)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
