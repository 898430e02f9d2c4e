"""GBLM-Pruner (Das et al., 2023): Wanda's score plus a gradient term, pruned within each output row.

    score_ij = |W_ij| · ‖X_j‖₂ / √N  +  α · |W_ij| · ‖G_ij‖₂

‖X_j‖₂ runs over all tokens of the N calibration windows; G_ij collects each window's gradient of its mean token
loss, ‖G_ij‖₂ its ℓ2 norm over the windows (the `gradient_norms` made by `main.py gradients`). The activation term
is divided by √N as in the authors' code (their Wanda statistic is a mean over windows), which is what α = 100 was
tuned against; with α = 0 the ranking is Wanda's. No weight update.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import LayerResult, Method, Statistic, Target
from .masks import select, select_count
from .statistics import ColumnNorms


class GradientScores(ColumnNorms):
    """‖X_j‖₂ over the calibration inputs, with the layer's gradient norms."""

    def __init__(self, layer: nn.Linear, gradient_norms: torch.Tensor):
        super().__init__(layer)
        self.gradient_norms = gradient_norms.float()


@dataclass
class GBLM(Method):
    """alpha: weight of the gradient term; windows: how many calibration windows ‖X‖ sums over (their count is not
    in the layer inputs' shapes: OPT's MLP sees windows and tokens flattened together)."""

    alpha: float = 100.0
    windows: int = 128

    name = "gblm"
    summary = "prune by |W|·(‖X‖/√N + α‖G‖) within each output row (gradient norms from `main.py gradients`)"
    precomputed = ("gradient_norms",)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--alpha", type=float, default=100.0,
            help="gblm: weight of the gradient term |W|·‖G‖ against the activation term (default: 100)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "GBLM":
        if not (args.alpha >= 0 and math.isfinite(args.alpha)):
            raise ValueError(f"--alpha must be a finite number >= 0, got {args.alpha}")
        return cls(alpha=args.alpha, windows=args.nsamples)

    def statistic(self, layer: nn.Linear, gradient_norms: torch.Tensor) -> GradientScores:
        return GradientScores(layer, gradient_norms)

    def pruned_count(self, rows: int, columns: int, target: Target) -> int:
        """What `select` prunes per row (the sparse format sizes the kept values by it before any maths)."""
        return select_count(rows, columns, target, per_row=True)

    def compress(self, layer: nn.Linear, statistic: Statistic | None, target: Target) -> LayerResult:
        assert isinstance(statistic, GradientScores)
        weight = layer.weight.detach()
        activations = statistic.norms / math.sqrt(self.windows)
        scores = weight.float().abs() * (activations.unsqueeze(0) + self.alpha * statistic.gradient_norms)
        mask = select(scores, target, per_row=True)
        return LayerResult(weight.masked_fill(mask, 0), mask)
