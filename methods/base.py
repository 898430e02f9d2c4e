"""The interface every compression method implements.

A method is made from its settings and knows nothing of files, devices or schedules. For each linear layer of the
block being compressed, the scheduler:
1. asks `statistic(layer)` for an accumulator of what the method needs from the layer's inputs (None: nothing);
2. feeds it every calibration micro-batch's inputs to that layer (`Statistic.update`);
3. calls `compress(layer, statistic, target)` and writes the returned weight back into the layer.
A target asks for pruning (sparsity or N:M), quantization (a `QuantSpec`), or both; `check(target)` refuses, before
any work is done, what the method cannot do.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .quant import QuantRecord, QuantSpec


@dataclass(frozen=True)
class Target:
    """What one linear layer must become.

    sparsity: fraction of its weights set to zero (unstructured);
    pattern: (n, m) for N:M sparsity, n zeros in every m consecutive input weights of a row (overrides sparsity);
    quant: the integer grid the kept weights must land on (None: they keep their dtype).
    """

    sparsity: float = 0.0
    pattern: tuple[int, int] | None = None
    quant: QuantSpec | None = None

    @property
    def is_dense(self) -> bool:
        """No pruning asked for (the weights may still be quantized)."""
        return self.pattern is None and self.sparsity == 0.0


@dataclass
class LayerResult:
    """A compressed layer: the new weight (same shape and dtype), where it was pruned, numbers worth logging, and
    for quantized targets the grid integers the weight stands for (output formats pack them as they are)."""

    weight: torch.Tensor
    mask: torch.Tensor | None = None  # bool, True where a weight was pruned
    info: dict[str, float] = field(default_factory=dict)
    quant: QuantRecord | None = None


class Statistic(ABC):
    """Accumulates what a method needs from one layer's inputs over all calibration micro-batches."""

    @abstractmethod
    def update(self, inputs: torch.Tensor) -> None:
        """inputs: one micro-batch of the layer's inputs, shape (..., in_features)."""


class Method(ABC):
    """A compression method: settings in the constructor, per-layer maths in `compress`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    prunes: ClassVar[bool] = True  # accepts sparsity and N:M targets
    quantizes: ClassVar[bool] = False  # accepts targets with a quantization grid

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this method's own command-line options (all methods share --sparsity and --pattern)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Method":
        return cls()

    def settings(self) -> dict:
        """Everything that changes this method's result, for the output record and the resume fingerprint."""
        return asdict(self) if hasattr(self, "__dataclass_fields__") else {}

    def check(self, target: Target) -> None:
        """Raise ValueError when this method cannot reach `target` (called before any work is done)."""
        if not target.is_dense and not self.prunes:
            raise ValueError(f"{self.name} only quantizes: it takes no sparsity or N:M pattern")
        if target.quant is not None and not self.quantizes:
            raise ValueError(f"{self.name} does not quantize: it takes no bit width")
        if target.quant is None and not self.prunes:
            raise ValueError(f"{self.name} quantizes: it needs a bit width")

    def pruned_count(self, rows: int, columns: int, target: Target) -> int | None:
        """Exactly how many weights `compress` prunes in a rows × columns layer (the sparse output format sizes its
        values by it before any layer is compressed); None when the method cannot say."""
        return None

    def statistic(self, layer: nn.Linear) -> Statistic | None:
        """An accumulator for this layer's inputs, or None when the method needs no calibration data."""
        return None

    @abstractmethod
    def compress(self, layer: nn.Linear, statistic: Statistic | None, target: Target) -> LayerResult:
        """The compressed layer for `target`; must not modify `layer`."""
