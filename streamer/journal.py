"""The progress journal of an output directory: what is done, with which settings, where to resume.

It lives in OUT/.layerpress/journal.json, rewritten atomically (temporary file, fsync, rename) after each block,
only once that block's tensors and the next block's inputs are durable. It carries a checksum of itself, so a
damaged journal is detected rather than trusted. A lock file keeps two processes from writing one directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .errors import LayerpressError
from .failpoints import failpoint
from .files import atomic_write
from .writer import INDEX_FILE, PARTIAL_SUFFIX

log = logging.getLogger("layerpress")

WORK_DIR = ".layerpress"
JOURNAL_FILE = "journal.json"
FORMAT = 1


def library_versions() -> dict[str, str]:
    versions = {}
    for package in ("layerpress", "torch", "transformers", "safetensors", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_journal(out: Path) -> dict | None:
    """The journal of `out`, None if there is none; a damaged one is an error."""
    path = out / WORK_DIR / JOURNAL_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        body, checksum = data["body"], data["checksum"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise LayerpressError(f"corrupt progress journal {path}: unreadable; use --restart to start over") from exc
    if _checksum(body) != checksum:
        raise LayerpressError(f"corrupt progress journal {path}: checksum mismatch; use --restart to start over")
    return body


def describe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable `key: was X, now Y` for every setting that differs."""
    differences = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            differences += describe_differences(before, after, f"{prefix}{key}.")
        elif before != after:
            differences.append(f"{prefix}{key} was {before!r}, now {after!r}")
    return differences


class JournalProgress:
    """How far a run is, read from its journal's body (the writing run's, or a torchrun follower's copy)."""

    body: dict[str, Any]

    @property
    def complete(self) -> bool:
        return self.body["state"] == "complete"

    @property
    def blocks_done(self) -> int:
        return self.body["blocks_done"]


class Run(JournalProgress):
    """One command's claim on an output directory: fresh, resumed, or already complete."""

    def __init__(
        self,
        out: Path,
        command: str,
        settings: dict,
        fingerprints: dict[str, str],
        total_blocks: int,
        restart: bool = False,
    ):
        self.out = out
        self.work = self.work_dir(out)
        self._lock = None
        if out.exists() and not out.is_dir():
            raise LayerpressError(f"output path {out} is a file, not a directory")
        with_journal = out.is_dir() and (self.work / JOURNAL_FILE).is_file()
        if out.is_dir() and any(out.iterdir()) and not (self.work.is_dir()):
            raise LayerpressError(f"output directory {out} is not empty and holds no layerpress run; choose another")
        try:
            self.work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LayerpressError(f"cannot create output directory {out}: {exc.strerror}") from exc
        self._acquire_lock()
        previous = None
        if restart:
            self._discard()
        elif with_journal:
            previous = read_journal(out)
        if previous is not None:
            self._check_same(previous, command, settings, fingerprints)
            self.body = previous
            changed = describe_differences(previous.get("versions", {}), library_versions())
            if changed:
                log.warning("resuming with other library versions (%s): later blocks may differ in the last bits",
                            "; ".join(changed))
        else:
            self.body = {
                "format": FORMAT,
                "command": command,
                "state": "running",
                "settings": settings,
                "fingerprints": fingerprints,
                "versions": library_versions(),
                "blocks_done": 0,
                "total_blocks": total_blocks,
                "inputs": None,
                "layers": {},
                "timings": [],
            }
            self.save()

    def phase(self, name: str, total_blocks: int) -> "Run":
        """A run of its own for one pass of a multi-pass command, journaled in this run's work directory (so
        --restart of this run discards it too), with this run's settings and fingerprints."""
        return Run(self.work / name, f"{self.body['command']}:{name}", self.body["settings"],
                   self.body["fingerprints"], total_blocks)

    @staticmethod
    def work_dir(out: Path) -> Path:
        """Where a run in `out` keeps its journal, lock and persisted activations."""
        return out / WORK_DIR

    # ---------------------------------------------------------------- lifecycle
    def _acquire_lock(self) -> None:
        self._lock = open(self.work / "lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise LayerpressError(f"another layerpress process is writing {self.out}") from exc

    def _discard(self) -> None:
        """--restart: remove what an earlier run wrote (shards, index, config, journal, activations)."""
        for path in self.out.iterdir():
            if path.name == WORK_DIR:
                for item in path.iterdir():
                    if item.name != "lock":
                        shutil.rmtree(item) if item.is_dir() else item.unlink()
            elif path.is_file() and (
                path.suffix == ".safetensors" or path.name.endswith(PARTIAL_SUFFIX) or path.name == INDEX_FILE
            ):
                path.unlink()

    def _check_same(self, previous: dict, command: str, settings: dict, fingerprints: dict) -> None:
        differences = describe_differences(
            {"command": previous.get("command"), **previous.get("settings", {}), **previous.get("fingerprints", {})},
            {"command": command, **settings, **fingerprints},
        )
        if differences:
            raise LayerpressError(
                f"{self.out} holds a run with other settings ({'; '.join(differences)}): "
                "run the same command to resume it, or add --restart to discard it"
            )

    def save(self) -> None:
        atomic_write(self.work / JOURNAL_FILE, json.dumps({"body": self.body, "checksum": _checksum(self.body)}).encode())

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ---------------------------------------------------------------- progress
    @property
    def inputs_file(self) -> Path | None:
        """Where the inputs of the next block are persisted (None: not yet, embed the calibration windows)."""
        return Path(self.body["inputs"]) if self.body["inputs"] else None

    def record_block(self, index: int, inputs_file: Path | None, record: dict[str, Any], timing: dict) -> None:
        """Block `index` is durable, and the next block's inputs are in `inputs_file`.

        `record` holds what the command wants kept (dicts are merged into the journal's, other values replace).
        """
        stale = self.inputs_file
        self.body["blocks_done"] = index + 1
        self.body["inputs"] = str(inputs_file) if inputs_file else None
        self.record(record, {"block": index, **timing})
        if stale is not None and stale != inputs_file and stale.parent == self.work:
            stale.unlink(missing_ok=True)

    def record(self, record: dict[str, Any], timing: dict | None = None) -> None:
        """Keep `record` (dicts are merged into the journal's, other values replace) and `timing`; save.

        For progress other than the forward walk over the blocks (e.g. the gradient pass's backward walk).
        """
        for key, value in record.items():
            if isinstance(value, dict) and isinstance(self.body.get(key), dict):
                self.body[key].update(value)
            else:
                self.body[key] = value
        if timing is not None:
            self.body["timings"].append(timing)
        failpoint("before-journal")  # the work is durable but not yet recorded
        self.save()
        failpoint("after-journal")  # recorded, the next step not yet started

    def finish(self, summary: dict[str, Any]) -> None:
        self.body.update(state="complete", inputs=None, summary=summary)
        self.save()
        for leftover in self.work.glob("inputs-*.bin*"):  # persisted activations, also of killed runs
            leftover.unlink()

    def persisted_inputs_path(self, block: int) -> Path:
        return self.work / f"inputs-{block:05d}.bin"
