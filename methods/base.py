"""The interfaces compression methods implement.

A method is made from its settings and knows nothing of files, devices or schedules.

`Method` (unstructured and N:M sparsity) works layer by layer. For each linear layer of the block being compressed,
one block's phases (streamer/block.py):
1. asks `statistic(layer)` for an accumulator of what the method needs from the layer's inputs (None: nothing);
   a method that declares `precomputed` tensors (made by an earlier pass, e.g. gradient norms) gets them here too;
   layers that read one input share one accumulator when the method says it may (`statistic_per_input`);
2. feeds it every calibration micro-batch's inputs to that layer (`Statistic.update`);
3. calls `compress(layer, statistic, target)` and writes the returned weight back into the layer.
A target asks for pruning (sparsity or N:M), quantization (a `QuantSpec`), or both; `check(target)` refuses, before
any work is done, what the method cannot do.

`StructuredMethod` removes whole units (attention heads, MLP channels) with one decision for the whole model, so it
works in two passes over the blocks (streamer/commands/structured.py):
1. statistics: for each channel group of each block (see streamer/adapters/base.py: ChannelGroup), `statistic` of
   the group's consumer layer is fed its inputs, and `summarize` turns it into a `ChannelSummary`, kept on disk;
2. `select` sees every group's scores at once and decides which units stay;
3. pruning: for each block, `prune` returns the group's layers cut down to the kept units.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar

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

    def combine(self, total: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Make this accumulator hold the observations of every share of the calibration windows, each share
        observed by an accumulator of the same layer: `total(t)` returns t summed over the shares (in place).
        The default refuses; an accumulator of sums adds them up."""
        raise NotImplementedError(f"{type(self).__name__} cannot combine shares of the calibration windows")

    @property
    def nbytes(self) -> int:
        """Memory held by the accumulator's tensors (also for one made on the meta device, as the planner does)."""
        return sum(value.nbytes for value in vars(self).values() if isinstance(value, torch.Tensor))


@dataclass(frozen=True)
class LayerCost:
    """What compressing one linear layer costs besides the layer and its statistic (see Method.layer_cost).

    The memory planner (streamer/planner.py) sums these; the statistic's own size it measures from the statistic.
    working_bytes: peak of the copies, factors, masks and the result while `compress` runs;
    kept_bytes: what the returned LayerResult holds besides the weight (its mask, its grid integers): it stays until
        the block is written, so the planner adds it for every layer compressed before the one it looks at;
    factored: side of the largest square matrix factorized in place (0: none); CUDA's solvers copy it once more;
    matmul_flops, factor_flops: float32 matrix-product and factorization work of `compress`;
    sequential_ops, sequential_bytes: small operations that must run one after another (a column sweep) and the
        bytes they touch: they cost launch latency and memory bandwidth rather than flops;
    update_flops_per_token, update_bytes_per_token: the statistic's work per calibration token, and the transient
        copy of a micro-batch's inputs it makes;
    update_precision: what that work's matrix products run in ("float32", "tf32" or "bfloat16": a Gram's
        gram_dtype), so that it can be timed at that precision's rate;
    update_moved_bytes_per_token: memory traffic of the update per token beyond its products' own (a bfloat16
        Gram adds each chunk's product into the float32 sum), timed at the device's bandwidth.
    """

    working_bytes: int
    kept_bytes: int = 0
    factored: int = 0
    matmul_flops: float = 0.0
    factor_flops: float = 0.0
    sequential_ops: int = 0
    sequential_bytes: float = 0.0
    update_flops_per_token: float = 0.0
    update_bytes_per_token: int = 0
    update_precision: str = "float32"
    update_moved_bytes_per_token: float = 0.0


class BaseMethod(ABC):
    """What every method has: a name, a one-line summary for --help, its own options and settings."""

    name: ClassVar[str]
    summary: ClassVar[str]
    #: Per-weight tensors from an earlier pass over the model that `statistic` takes as keyword arguments, each the
    #: shape of the layer's weight, on its device: "gradient_norms" is ‖∂loss/∂W_ij‖₂ over the calibration windows
    #: (`main.py gradients`). The compress command finds them for each layer; most methods need none.
    precomputed: ClassVar[tuple[str, ...]] = ()
    #: True when `statistic(layer)` depends on nothing of the layer but its in_features and device, and what
    #: consumes it only reads it: then layers that read the same input tensor (q/k/v, gate/up) share one statistic,
    #: observed once and handed to each of them in turn.
    statistic_per_input: ClassVar[bool] = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this method's own command-line options (unstructured methods share --sparsity and --pattern)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BaseMethod":
        return cls()

    def settings(self) -> dict:
        """Everything that changes this method's result, for the output record and the resume fingerprint."""
        return asdict(self) if hasattr(self, "__dataclass_fields__") else {}

    def block_statistic_bytes(self, width: int, tokens: int) -> int:
        """What a statistic of the whole block, fed its hidden states `tokens` at a time after the block is
        propagated, holds (the planner's "block statistic" phase); most methods keep none."""
        return 0


class Method(BaseMethod):
    """A per-layer compression method: settings in the constructor, per-layer maths in `compress`."""

    prunes: ClassVar[bool] = True  # accepts sparsity and N:M targets
    quantizes: ClassVar[bool] = False  # accepts targets with a quantization grid

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

    def statistic(self, layer: nn.Linear, **precomputed: torch.Tensor) -> Statistic | None:
        """An accumulator for this layer's inputs, or None when the method needs no calibration data.

        `precomputed`: the tensors named by the class's `precomputed`, for this layer.
        """
        return None

    @abstractmethod
    def compress(self, layer: nn.Linear, statistic: Statistic | None, target: Target) -> LayerResult:
        """The compressed layer for `target`; must not modify `layer`."""

    def layer_cost(self, rows: int, columns: int, dtype: torch.dtype, target: Target) -> LayerCost:
        """Memory and work of `compress` on a (rows, columns) layer of `dtype` for `target`, for the planner.

        The default is a generic guess (a float32 score, a selection of the same size and the result, which keeps
        a byte per weight: a mask or grid integers); methods override it with their own accounting.
        """
        return LayerCost(working_bytes=rows * columns * (3 * 4 + dtype.itemsize), kept_bytes=rows * columns)


@dataclass
class ChannelSummary:
    """What a structured method keeps of one channel group of one block between its two passes.

    score: importance of each consumer input channel (higher: more worth keeping), on the method's own scale.
    mean: mean of each consumer input channel over all calibration tokens (for compensating removed channels).
    """

    score: torch.Tensor
    mean: torch.Tensor


@dataclass
class UnitGroup:
    """The removable units of one channel group in one block, as the global search sees them.

    block, name: which block and group ("attention", "mlp"); scores: the summary's per-channel scores, the units
    laid out one after another (unit u is channels u·w .. (u+1)·w − 1); cost: parameters removed with one unit.
    """

    block: int
    name: str
    scores: torch.Tensor
    units: int
    cost: int

    @property
    def width(self) -> int:
        return self.scores.numel() // self.units


@dataclass
class PrunedLayer:
    """A linear layer cut down to the kept units (bias None: the layer has none)."""

    weight: torch.Tensor
    bias: torch.Tensor | None


class StructuredMethod(BaseMethod):
    """Removes whole units across the model: statistics per block, one global selection, pruning per block."""

    @property
    def adds_bias(self) -> bool:
        """Whether pruned consumers carry a bias (a compensation), to be added where the family has none."""
        return False

    @abstractmethod
    def statistic(self, consumer: nn.Linear) -> Statistic:
        """An accumulator for the inputs of a channel group's consumer layer."""

    @abstractmethod
    def summarize(self, consumer: nn.Linear, statistic: Statistic) -> ChannelSummary:
        """Per-channel scores and means of the consumer's inputs, from its weight and its accumulated inputs."""

    @abstractmethod
    def select(self, groups: list[UnitGroup]) -> list[torch.Tensor]:
        """For every group, a bool mask over its units: True for the units that stay (at least one per group)."""

    @abstractmethod
    def prune(
        self, producers: dict[str, nn.Linear], consumer: nn.Linear, keep: torch.Tensor, summary: ChannelSummary
    ) -> tuple[dict[str, PrunedLayer], PrunedLayer]:
        """The group's producers (rows) and consumer (columns) cut down to the units where `keep` is True."""
