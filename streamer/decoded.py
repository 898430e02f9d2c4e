"""Reading packed and sparse outputs as the dense checkpoints they stand for.

`open_checkpoint` gives every command the dense view of a directory: a packed or sparse layerpress output is read
through `DecodedCheckpoint`, which decodes a compressed layer's tensors into its weight when the weight is read, so
`eval`, `compress` and `decompress` (streamer/commands/decompress.py) take such outputs as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from methods import QuantSpec

from .checkpoint import Checkpoint, TensorEntry
from .errors import LayerpressError
from .formats import FORMATS, Format, LayerPlan


@dataclass(frozen=True)
class DecodedEntry:
    """A weight stored as a format's tensors (suffix -> stored name), read back whole."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    parts: dict[str, str]


class DecodedCheckpoint:
    """A packed or sparse output seen as dense: the same names, dtypes and order as `--format dense` writes."""

    def __init__(self, stored: Checkpoint, fmt: Format):
        self.stored, self.format = stored, fmt
        self.directory = stored.directory
        self.record = dict(stored.config["layerpress"])
        self.config = {key: value for key, value in stored.config.items() if key != "quantization_config"}
        self.config["layerpress"] = {**self.record, "format": "dense", "decompressed_from": fmt.name}
        try:
            self.dtype = getattr(torch, self.record["weight_dtype"])
            grid = self.record.get("quantization")
            self.layer_bits: dict[str, int] = self.record.get("layer_bits") or {}
            bits = {grid["bits"]} if grid and not self.layer_bits else set(self.layer_bits.values())
            self.grids = {b: QuantSpec(**{**grid, "bits": b}) for b in bits} if grid else {}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LayerpressError(f"{self.directory}: damaged layerpress record in config.json ({exc})") from exc
        self.entries: dict[str, TensorEntry | DecodedEntry] = {}
        self._group(stored.entries)

    def _group(self, stored: dict[str, TensorEntry]) -> None:
        """Gather each layer's tensors under its weight's name, at the place of its first tensor."""
        pattern = re.compile(r"(.*\.weight)_(" + "|".join(self.format.parts) + r")$")
        parts: dict[str, dict[str, str]] = {}
        for name in stored:
            match = pattern.fullmatch(name)
            if match is None or match.group(1) in stored:
                self.entries[name] = stored[name]
                continue
            weight = match.group(1)
            if weight not in parts:
                parts[weight] = {}
                self.entries[weight] = None  # keeps its place
            parts[weight][match.group(2)] = name
        shapes = self.stored.read([layer["shape"] for layer in parts.values() if "shape" in layer])
        for weight, layer in parts.items():
            if "shape" not in layer:
                raise LayerpressError(f"{self.directory}: {weight} is stored without its weight_shape")
            shape = tuple(int(dim) for dim in shapes[layer["shape"]])
            self.entries[weight] = DecodedEntry(weight, self.dtype, shape, layer)

    def grid(self, weight: str) -> QuantSpec | None:
        """The grid of a stored weight: the run's, with its own bits when a bits policy chose them per layer."""
        if not self.grids:
            return None
        if not self.layer_bits:
            return next(iter(self.grids.values()))
        module = weight.removesuffix(".weight")  # checkpoint names may lack the model's leading prefix, or add one
        for name, bits in self.layer_bits.items():
            if name == module or name.endswith("." + module) or module.endswith("." + name):
                return self.grids[bits]
        raise LayerpressError(f"{self.directory}: config.json's layer_bits has no entry for {weight}")

    def fingerprint(self) -> str:
        return self.stored.fingerprint()

    @property
    def bytes_read(self) -> int:
        return self.stored.bytes_read

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        unknown = [name for name in names if name not in self.entries]
        if unknown:
            raise LayerpressError(f"checkpoint {self.directory} lacks tensor {unknown[0]!r}")
        decoded = [self.entries[name] for name in names if isinstance(self.entries[name], DecodedEntry)]
        wanted = [name for name in names if not isinstance(self.entries[name], DecodedEntry)]
        stored = self.stored.read(wanted + [part for entry in decoded for part in entry.parts.values()])
        tensors = {name: stored[name] for name in wanted}
        for entry in decoded:
            plan = LayerPlan(entry.name, entry.dtype, entry.shape, entry.dtype, self.grid(entry.name))  # scales: own dtype
            parts = {suffix: stored[part] for suffix, part in entry.parts.items()}
            tensors[entry.name] = self.format.decode(plan, parts)
        return {name: tensors[name] for name in names}


def open_checkpoint(directory: Path) -> Checkpoint | DecodedCheckpoint:
    """The checkpoint in `directory` as dense tensors, whatever format layerpress wrote it in."""
    checkpoint = Checkpoint(directory)
    name = (checkpoint.config.get("layerpress") or {}).get("format", "dense")
    if name not in FORMATS:
        raise LayerpressError(f"{directory} was written in format {name!r}, which this layerpress cannot read")
    return checkpoint if name == "dense" else DecodedCheckpoint(checkpoint, FORMATS[name])
