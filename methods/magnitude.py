"""Magnitude pruning: drop the smallest |W|, the data-free baseline every other method must beat."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from .base import LayerCost, LayerResult, Method, Statistic, Target
from .masks import select, select_count, selection_bytes


@dataclass
class Magnitude(Method):
    """scope: compare weights across the whole matrix ("matrix") or within each output row ("row")."""

    scope: str = "matrix"

    name = "magnitude"
    summary = "prune the smallest |W| (no calibration data)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--magnitude-scope", choices=("matrix", "row"), default="matrix",
            help="magnitude: compare weights across each whole matrix or within each output row (default: matrix)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Magnitude":
        return cls(scope=args.magnitude_scope)

    def pruned_count(self, rows: int, columns: int, target: Target) -> int:
        return select_count(rows, columns, target, per_row=self.scope == "row")

    def compress(self, layer: nn.Linear, statistic: Statistic | None, target: Target) -> LayerResult:
        weight = layer.weight.detach()
        mask = select(weight.float().abs(), target, per_row=self.scope == "row")
        return LayerResult(weight.masked_fill(mask, 0), mask)

    def layer_cost(self, rows: int, columns: int, dtype: torch.dtype, target: Target) -> LayerCost:
        """|W| in float32, the selection, the result (and its mask, kept)."""
        selection = selection_bytes(rows, columns, target, per_row=self.scope == "row")
        return LayerCost(working_bytes=rows * columns * (4 + dtype.itemsize) + selection, kept_bytes=rows * columns)
