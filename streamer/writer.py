"""Sharded safetensors output, written as blocks finish, resumable after a crash.

The layout is planned before the first byte is written: the output tensors' names, dtypes and shapes are known up
front, so every shard's header (and the number of shards, for the usual model-0000k-of-0000n names) is fixed. Each
shard is written to `NAME.partial`, header first, then tensor by tensor as blocks complete; when its last tensor is
in, it is fsynced and renamed. The journal records how many tensors and bytes are safely on disk, so a resumed run
truncates a half-written shard to that point and carries on: every byte is written once, memory holds one block.
The index, which makes the directory loadable, is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import DTYPE_NAMES, INDEX_FILE
from .errors import LayerpressError
from .failpoints import failpoint
from .files import atomic_write, fsync_directory, guard_disk

PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize


@dataclass
class WriterState:
    """What is safely on disk (JSON-serializable, kept in the journal)."""

    written: int = 0  # tensors written, in plan order
    shard_bytes: int = 0  # bytes of the current partial shard that are on disk (0: not started)
    checksums: list[str] = field(default_factory=list)  # sha256 of each finished shard


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def encode_header(specs: list[TensorSpec]) -> bytes:
    """The safetensors header for tensors stored back to back in this order (padded to 8-byte alignment)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def safetensors_parts(tensors: dict[str, torch.Tensor]) -> Iterator[bytes | memoryview]:
    """A safetensors file of `tensors` as its header, then each tensor's own bytes (the data are not copied)."""
    yield encode_header([TensorSpec(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()])
    for tensor in tensors.values():
        yield tensor_bytes(tensor)


class ShardWriter:
    """Appends tensors in plan order to the shards of an output directory."""

    def __init__(self, directory: Path, specs: list[TensorSpec], max_bytes: int, state: WriterState | None = None):
        self.directory = directory
        self.shards = plan_shards(specs, max_bytes)
        self.order = [(shard, spec) for shard, group in enumerate(self.shards) for spec in group]
        self.state = state or WriterState()
        self.bytes_written = 0
        self._handle = None
        self._hash = None
        if self.state.written < len(self.order) and self.state.shard_bytes:
            self._reopen()

    @property
    def files(self) -> list[str]:
        return [shard_file_name(i, len(self.shards)) for i in range(len(self.shards))]

    def _path(self, shard: int, partial: bool) -> Path:
        return self.directory / (self.files[shard] + (PARTIAL_SUFFIX if partial else ""))

    def _reopen(self) -> None:
        """Resume the current shard: drop whatever was written after the journal's record, rehash the rest."""
        shard = self.order[self.state.written][0]
        path = self._path(shard, partial=True)
        finished = self._path(shard, partial=False)
        if not path.is_file() and finished.is_file():  # completed and renamed after the journal's last record
            os.replace(finished, path)
        if not path.is_file() or path.stat().st_size < self.state.shard_bytes:
            raise LayerpressError(f"output shard {path} is missing or shorter than the journal records; use --restart")
        with guard_disk(path):
            self._handle = open(path, "r+b")
            self._handle.truncate(self.state.shard_bytes)
            self._hash = hashlib.sha256()
            self._handle.seek(0)
            remaining = self.state.shard_bytes
            while remaining:
                chunk = self._handle.read(min(remaining, 1 << 24))
                self._hash.update(chunk)
                remaining -= len(chunk)
            self._handle.seek(self.state.shard_bytes)

    def _start(self, shard: int) -> None:
        path = self._path(shard, partial=True)
        header = encode_header(self.shards[shard])
        with guard_disk(path):
            self._handle = open(path, "wb")
            self._handle.write(header)
        self._hash = hashlib.sha256(header)
        self.state.shard_bytes = len(header)
        self.bytes_written += len(header)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the plan (its name, dtype and shape must match the plan)."""
        shard, spec = self.order[self.state.written]
        if (name, tensor.dtype, tuple(tensor.shape)) != (spec.name, spec.dtype, spec.shape):
            raise RuntimeError(f"writer expected {spec}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if self._handle is None:
            self._start(shard)
        data = tensor_bytes(tensor)
        path = self._path(shard, partial=True)
        with guard_disk(path):
            half = len(data) // 2
            self._handle.write(data[:half])
            failpoint("shard-write")  # dies with a tensor half written
            self._handle.write(data[half:])
        self._hash.update(data)
        self.state.shard_bytes += spec.nbytes
        self.state.written += 1
        self.bytes_written += spec.nbytes
        if self.state.written == len(self.order) or self.order[self.state.written][0] != shard:
            self._close(shard)

    def _close(self, shard: int) -> None:
        path = self._path(shard, partial=True)
        with guard_disk(path):
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.replace(path, self._path(shard, partial=False))
            fsync_directory(self.directory)
        self._handle = None
        self.state.checksums.append(self._hash.hexdigest())
        self.state.shard_bytes = 0

    def sync(self) -> None:
        """Make everything written so far durable (before the journal records it)."""
        if self._handle is not None:
            with guard_disk(self._path(self.order[self.state.written][0], partial=True)):
                self._handle.flush()
                os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def write_index(self) -> None:
        """The index, written last: only a complete output directory has one."""
        if self.state.written != len(self.order):
            raise RuntimeError("index requested before every tensor was written")
        weight_map = {spec.name: self.files[shard] for shard, spec in self.order}
        total = sum(spec.nbytes for _, spec in self.order)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(self.directory / INDEX_FILE, json.dumps(index, indent=2).encode())


def copy_side_files(source: Path, destination: Path) -> None:
    """Copy tokenizer and generation files (everything but the weights, the index and config.json)."""
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix == ".safetensors" or path.name in {INDEX_FILE, "config.json"}:
            continue
        with guard_disk(destination / path.name):
            temporary = destination / (path.name + ".tmp")
            shutil.copyfile(path, temporary)
            os.replace(temporary, destination / path.name)
