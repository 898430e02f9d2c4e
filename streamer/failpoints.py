"""Named points where a test can make the process die or the disk fill, to prove that every crash resumes.

Set LAYERPRESS_FAILPOINT=NAME:N[:ACTION] to act at the N-th time (1-based) the point NAME is reached: ACTION `kill`
(the default) sends SIGKILL to this process, `enospc` raises the OSError of a full disk. Unset, a point costs one
dictionary lookup. Under torchrun, LAYERPRESS_FAILPOINT_RANK=R makes only rank R act (unset: every rank).
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


def failpoint(name: str) -> None:
    spec = os.environ.get("LAYERPRESS_FAILPOINT")
    if not spec:
        return
    wanted, count, *action = spec.split(":")
    if wanted != name or os.environ.get("LAYERPRESS_FAILPOINT_RANK", os.environ.get("RANK")) != os.environ.get("RANK"):
        return
    _hits[name] += 1
    if _hits[name] != int(count):
        return
    if action and action[0] == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), signal.SIGKILL)
