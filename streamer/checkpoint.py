"""Lazy reading of a sharded safetensors checkpoint.

Only the headers are read up front (and validated, so a corrupt shard fails before any work is done); tensor bytes
are read on demand with plain file reads straight into torch storage. No shard is memory-mapped, so pages of blocks
already processed never linger in this process's resident set.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LayerpressError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie on disk."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict, int]:
    """Parse and validate one safetensors header; returns (header, offset of the data section)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise LayerpressError(f"corrupt safetensors file {path}: shorter than its 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise LayerpressError(f"corrupt safetensors header in {path}: header length {header_len} is impossible")
            raw = handle.read(header_len)
    except OSError as exc:
        raise LayerpressError(f"cannot read checkpoint shard {path}: {exc.strerror}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayerpressError(f"corrupt safetensors header in {path}: {exc}") from exc
    if not isinstance(header, dict):
        raise LayerpressError(f"corrupt safetensors header in {path}: not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
        except (KeyError, TypeError, ValueError) as exc:
            raise LayerpressError(f"corrupt safetensors header in {path}: bad entry for {name!r}") from exc
        if not 0 <= begin <= end <= data_size or end - begin != numel * dtype.itemsize:
            raise LayerpressError(
                f"corrupt safetensors file {path}: tensor {name!r} lies outside the file or has the wrong size"
            )
    return header, data_start


class Checkpoint:
    """A Hugging Face checkpoint directory: config.json plus one or more safetensors shards."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise LayerpressError(f"model directory {self.directory} does not exist")
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise LayerpressError(f"{self.directory} has no config.json: not a Hugging Face checkpoint")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise LayerpressError(f"corrupt config.json in {self.directory}: {exc}") from exc
        self.entries: dict[str, TensorEntry] = {}
        self._fingerprint = hashlib.sha256(config_path.read_bytes())
        self.bytes_read = 0
        for shard in self._shard_files():
            self._add_shard(shard)

    def _shard_files(self) -> list[Path]:
        index_path = self.directory / INDEX_FILE
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
                names = list(dict.fromkeys(index["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as exc:
                raise LayerpressError(f"corrupt {INDEX_FILE} in {self.directory}") from exc
            self._fingerprint.update(index_path.read_bytes())
            self._expected = index["weight_map"]
        elif (self.directory / SINGLE_FILE).is_file():
            names = [SINGLE_FILE]
            self._expected = None
        else:
            raise LayerpressError(f"{self.directory} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        shards = [self.directory / name for name in names]
        for shard in shards:
            if not shard.is_file():
                raise LayerpressError(f"missing checkpoint shard {shard} (listed in {INDEX_FILE})")
        return shards

    def _add_shard(self, path: Path) -> None:
        header, data_start = read_header(path)
        self._fingerprint.update(path.name.encode())
        self._fingerprint.update(json.dumps(header, sort_keys=True).encode())
        stat = path.stat()
        self._fingerprint.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())  # a rewritten shard differs
        tensors = sorted(
            ((name, info) for name, info in header.items() if name != "__metadata__"),
            key=lambda item: item[1]["data_offsets"][0],
        )
        for name, info in tensors:
            if self._expected is not None and self._expected.get(name) != path.name:
                continue  # the index is authoritative about which shard holds a tensor
            begin, end = info["data_offsets"]
            self.entries[name] = TensorEntry(
                name, DTYPES[info["dtype"]], tuple(info["shape"]), path, data_start + begin, data_start + end
            )
        if self._expected is not None:
            missing = [name for name, file in self._expected.items() if file == path.name and name not in self.entries]
            if missing:
                raise LayerpressError(f"corrupt checkpoint: shard {path.name} lacks tensor {missing[0]!r} named in the index")

    def fingerprint(self) -> str:
        """Identifies the checkpoint by its config, index, shard headers, sizes and modification times.

        Cheap (no tensor bytes are read), and any shard rewritten since changes it.
        """
        return self._fingerprint.hexdigest()

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors from disk (grouped by shard, in file order) into fresh CPU tensors."""
        unknown = [name for name in names if name not in self.entries]
        if unknown:
            raise LayerpressError(f"checkpoint {self.directory} lacks tensor {unknown[0]!r}")
        wanted = sorted((self.entries[name] for name in names), key=lambda e: (str(e.file), e.start))
        tensors: dict[str, torch.Tensor] = {}
        handle = None
        try:
            for entry in wanted:
                if handle is None or handle.name != str(entry.file):
                    if handle is not None:
                        handle.close()
                    handle = open(entry.file, "rb", buffering=0)
                tensors[entry.name] = self._read_entry(handle, entry)
        except OSError as exc:
            raise LayerpressError(f"cannot read checkpoint shard: {exc}") from exc
        finally:
            if handle is not None:
                handle.close()
        return {name: tensors[name] for name in names}

    def _read_entry(self, handle, entry: TensorEntry) -> torch.Tensor:
        raw = torch.empty(entry.nbytes, dtype=torch.uint8)
        handle.seek(entry.start)
        view = memoryview(raw.numpy())
        done = 0
        while done < entry.nbytes:
            count = handle.readinto(view[done:])
            if not count:
                raise LayerpressError(f"checkpoint shard {entry.file} ends inside tensor {entry.name!r}")
            done += count
        self.bytes_read += entry.nbytes
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        return raw.view(entry.dtype).reshape(entry.shape)
