"""Wanda (Sun et al., 2023): score |W_ij|·‖X_j‖₂, prune the lowest within each output row. No weight update."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import LayerCost, LayerResult, Method, Statistic, Target
from .masks import select, select_count, selection_bytes
from .statistics import ColumnNorms


@dataclass
class Wanda(Method):
    name = "wanda"
    summary = "prune by |W|·‖X‖ within each output row (calibration activations, no weight update)"
    statistic_per_input = True

    def statistic(self, layer: nn.Linear) -> ColumnNorms:
        return ColumnNorms(layer)

    def pruned_count(self, rows: int, columns: int, target: Target) -> int:
        return select_count(rows, columns, target, per_row=True)

    def compress(self, layer: nn.Linear, statistic: Statistic | None, target: Target) -> LayerResult:
        assert isinstance(statistic, ColumnNorms)
        weight = layer.weight.detach()
        scores = weight.float().abs() * statistic.norms.unsqueeze(0)
        mask = select(scores, target, per_row=True)
        return LayerResult(weight.masked_fill(mask, 0), mask)

    def layer_cost(self, rows: int, columns: int, dtype: torch.dtype, target: Target) -> LayerCost:
        """The float32 scores, the selection, the result (and its mask, kept); the statistic squares each input
        (float32)."""
        return LayerCost(
            working_bytes=rows * columns * (4 + dtype.itemsize) + selection_bytes(rows, columns, target, per_row=True),
            kept_bytes=rows * columns,
            update_flops_per_token=2.0 * columns,
            update_bytes_per_token=4 * columns * (1 if dtype == torch.float32 else 2),
        )
