"""One resumable run of a command: every command that writes an output directory goes through it.

    check the output is not the input ─► claim the directory: fresh, resumed or complete ─► work ─► release

The claim is a `Run` (streamer/journal.py): its journal holds what is done and with which settings, its lock keeps
a second process out, and a run with other settings is refused with the differences listed. Under torchrun rank 0
claims the directory and journals; the other ranks wait for its claim, then follow its journal (`FollowerRun`):
where to resume, and their own persisted activations. The world size is one of the run's settings: a partial run
resumes only with the world size that started it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..distributed import World, world
from ..errors import LayerpressError, RankFollows
from ..journal import JournalProgress, Run, read_journal

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
        ranks = world()
        if ranks.distributed:
            settings = {**settings, "world_size": ranks.size}
        run = self._claim(ranks, settings, fingerprints, total_blocks)
        try:
            if run.complete:
                log.info("%s is already complete; nothing to do (use --restart to redo it)", self.out)
            else:
                work(run)
        finally:
            run.close()

    def _claim(self, ranks: World, settings: dict[str, Any], fingerprints: dict[str, str],
               total_blocks: int) -> Run:
        """Rank 0's claim, or a follower of it."""

        def claim() -> Run:
            self._check_world_size(settings.get("world_size", 1))
            return Run(self.out, self.command, settings, fingerprints, total_blocks, restart=self.restart)

        return _made_by_writer(ranks, self.out, claim)

    def _check_world_size(self, size: int) -> None:
        """A partial run resumes only with the world size that started it (its windows are shared by rank)."""
        if self.restart or not self.out.is_dir():
            return
        body = read_journal(self.out)
        started = body["settings"].get("world_size", 1) if body is not None else size
        if body is not None and body["state"] != "complete" and started != size:
            raise LayerpressError(
                f"{self.out} holds a partial run started by {started} process(es) (torchrun world size): resume it "
                f"with world size {started}, not {size}, or add --restart to discard it"
            )


def open_phase(run: Run, name: str, total_blocks: int) -> Run:
    """One pass of a multi-pass command (`Run.phase`): rank 0 journals it, the other ranks follow it once it is
    there."""
    return _made_by_writer(world(), run.work / name, lambda: run.phase(name, total_blocks))


def _made_by_writer(ranks: World, out: Path, make: Callable[[], Run]) -> Run:
    """Rank 0's `make()`, or on the other ranks a follower of the run it made in `out`; a refusal on rank 0 is
    broadcast, so that every rank stops on it (rank 0 alone reports it)."""
    refusal, run = None, None
    if ranks.is_writer:
        try:
            run = make()
        except LayerpressError as exc:
            refusal = str(exc)
    refusal = ranks.broadcast(refusal, owner=0)
    if refusal is not None:
        raise LayerpressError(refusal) if ranks.is_writer else RankFollows(refusal)
    return run if run is not None else FollowerRun(out, ranks)


class FollowerRun(JournalProgress):
    """Rank r > 0's view of the run rank 0 journals: where to resume, and this rank's own persisted inputs.

    The journal lists every rank's inputs file (`rank_inputs`). A follower removes its older inputs files only two
    blocks later: by then rank 0 has journaled a later block, so no journal names them any more."""

    def __init__(self, out: Path, ranks: World):
        self.out, self.ranks = out, ranks
        body = read_journal(out)
        if body is None:
            raise LayerpressError(f"{ranks.describe()}: rank 0 claimed {out} but its journal is not readable here "
                                  "(every rank must see the same filesystem)")
        self.body = body
        self.work = Run.work_dir(out)
        self._kept: list[Path] = [self.inputs_file] if self.inputs_file is not None else []

    @property
    def inputs_file(self) -> Path | None:
        paths = self.body.get("rank_inputs")
        return Path(paths[self.ranks.rank]) if paths and self.blocks_done else None

    def persisted_inputs_path(self, block: int) -> Path:
        return self.work / f"inputs-{block:05d}.rank{self.ranks.rank}.bin"

    def record_block(self, index: int, inputs_file: Path | None, record: dict[str, Any], timing: dict) -> None:
        self.body["blocks_done"] = index + 1
        self.record(record)
        if inputs_file is not None and inputs_file not in self._kept:
            self._kept.append(inputs_file)
        while len(self._kept) > 2:
            stale = self._kept.pop(0)
            if stale.parent == self.work:
                stale.unlink(missing_ok=True)

    def record(self, record: dict[str, Any], timing: dict | None = None) -> None:
        self.body.update(record)

    def finish(self, summary: dict[str, Any]) -> None:
        self.body["state"] = "complete"

    def close(self) -> None:
        """Nothing to release: rank 0 holds the lock."""
