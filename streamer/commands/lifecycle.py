"""One resumable run of a command: every command that writes an output directory goes through it.

    check the output is not the input ─► claim the directory: fresh, resumed or complete ─► work ─► release

The claim is a `Run` (streamer/journal.py): its journal holds what is done and with which settings, its lock keeps
a second process out, and a run with other settings is refused with the differences listed. This is also where
distributed ranks will agree on a claim (one rank writes and journals, every rank reads where to resume).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import LayerpressError
from ..journal import Run

log = logging.getLogger("layerpress")


@dataclass(frozen=True)
class RunRequest:
    """What a command asks of its output directory; checked when made, before anything is read."""

    command: str
    out: Path
    source: Path
    restart: bool = False

    def __post_init__(self) -> None:
        if self.out.resolve() == self.source.resolve():
            raise LayerpressError("the output directory must differ from the model directory")

    def execute(self, settings: dict[str, Any], fingerprints: dict[str, str], total_blocks: int,
                work: Callable[[Run], None]) -> None:
        """Claim the directory for these settings, run `work` unless the run is complete already, release it."""
        run = Run(self.out, self.command, settings, fingerprints, total_blocks, restart=self.restart)
        try:
            if run.complete:
                log.info("%s is already complete; nothing to do (use --restart to redo it)", self.out)
            else:
                work(run)
        finally:
            run.close()
