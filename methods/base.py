"""The interface every compression method implements.

A method is made from its settings and knows nothing of files, devices or schedules. For each linear layer of the
block being compressed, the scheduler:
1. asks `statistic(layer)` for an accumulator of what the method needs from the layer's inputs (None: nothing);
   a method that declares `precomputed` tensors (made by an earlier pass, e.g. gradient norms) gets them here too;
2. feeds it every calibration micro-batch's inputs to that layer (`Statistic.update`);
3. calls `compress(layer, statistic, target)` and writes the returned weight back into the layer.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class Target:
    """What one linear layer must become.

    sparsity: fraction of its weights set to zero (unstructured);
    pattern: (n, m) for N:M sparsity, n zeros in every m consecutive input weights of a row (overrides sparsity).
    """

    sparsity: float = 0.0
    pattern: tuple[int, int] | None = None

    @property
    def is_dense(self) -> bool:
        return self.pattern is None and self.sparsity == 0.0


@dataclass
class LayerResult:
    """A compressed layer: the new weight (same shape and dtype), where it was pruned, and numbers worth logging."""

    weight: torch.Tensor
    mask: torch.Tensor | None = None  # bool, True where a weight was pruned
    info: dict[str, float] = field(default_factory=dict)


class Statistic(ABC):
    """Accumulates what a method needs from one layer's inputs over all calibration micro-batches."""

    @abstractmethod
    def update(self, inputs: torch.Tensor) -> None:
        """inputs: one micro-batch of the layer's inputs, shape (..., in_features)."""


class Method(ABC):
    """A compression method: settings in the constructor, per-layer maths in `compress`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    #: Per-weight tensors from an earlier pass over the model that `statistic` takes as keyword arguments, each the
    #: shape of the layer's weight, on its device: "gradient_norms" is ‖∂loss/∂W_ij‖₂ over the calibration windows
    #: (`main.py gradients`). The scheduler finds them for each layer; most methods need none.
    precomputed: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this method's own command-line options (all methods share --sparsity and --pattern)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Method":
        return cls()

    def settings(self) -> dict:
        """Everything that changes this method's result, for the output record and the resume fingerprint."""
        return asdict(self) if hasattr(self, "__dataclass_fields__") else {}

    def statistic(self, layer: nn.Linear, **precomputed: torch.Tensor) -> Statistic | None:
        """An accumulator for this layer's inputs, or None when the method needs no calibration data.

        `precomputed`: the tensors named by the class's `precomputed`, for this layer.
        """
        return None

    @abstractmethod
    def compress(self, layer: nn.Linear, statistic: Statistic | None, target: Target) -> LayerResult:
        """The compressed layer for `target`; must not modify `layer`."""
