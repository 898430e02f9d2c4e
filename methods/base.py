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

    @property
    def nbytes(self) -> int:
        """Memory held by the accumulator's tensors (also for one made on the meta device, as the planner does)."""
        return sum(value.nbytes for value in vars(self).values() if isinstance(value, torch.Tensor))


@dataclass(frozen=True)
class LayerCost:
    """What compressing one linear layer costs besides the layer and its statistic (see Method.layer_cost).

    The memory planner (streamer/planner.py) sums these; the statistic's own size it measures from the statistic.
    working_bytes: peak of the copies, factors, masks and the result while `compress` runs;
    factored: side of the largest square matrix factorized in place (0: none); CUDA's solvers copy it once more;
    matmul_flops, factor_flops: float32 matrix-product and factorization work of `compress`;
    sequential_ops, sequential_bytes: small operations that must run one after another (a column sweep) and the
        bytes they touch: they cost launch latency and memory bandwidth rather than flops;
    update_flops_per_token, update_bytes_per_token: the statistic's work per calibration token, and the transient
        copy of a micro-batch's inputs it makes.
    """

    working_bytes: int
    factored: int = 0
    matmul_flops: float = 0.0
    factor_flops: float = 0.0
    sequential_ops: int = 0
    sequential_bytes: float = 0.0
    update_flops_per_token: float = 0.0
    update_bytes_per_token: int = 0


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

    def layer_cost(self, rows: int, columns: int, dtype: torch.dtype, target: Target) -> LayerCost:
        """Memory and work of `compress` on a (rows, columns) layer of `dtype` for `target`, for the planner.

        The default is a generic guess (a float32 score, a selection of the same size and the result); methods
        override it with their own accounting.
        """
        return LayerCost(working_bytes=rows * columns * (3 * 4 + dtype.itemsize))
