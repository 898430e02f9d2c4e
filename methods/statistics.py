"""Accumulators of layer-input statistics, in float32 on the layer's device."""

from __future__ import annotations

import torch
from torch import nn

from .base import Statistic


class Gram(Statistic):
    """H = 2·XᵀX / N over all N calibration tokens: the Hessian of the layer-wise loss ‖WX − ŴX‖² / N."""

    def __init__(self, layer: nn.Linear):
        columns = layer.in_features
        self._sum = torch.zeros(columns, columns, dtype=torch.float32, device=layer.weight.device)
        self.tokens = 0

    def update(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        self._sum.addmm_(flat.T, flat)
        self.tokens += flat.shape[0]

    @property
    def gram(self) -> torch.Tensor:
        """XᵀX itself (not a copy): solvers scale it into their own working matrix, saving a copy of n² floats."""
        return self._sum

    @property
    def scale(self) -> float:
        """H = scale · XᵀX."""
        return 2.0 / max(self.tokens, 1)

    @property
    def hessian(self) -> torch.Tensor:
        return self._sum * self.scale


class ColumnNorms(Statistic):
    """‖X_j‖₂ for every input feature j over all calibration tokens."""

    def __init__(self, layer: nn.Linear):
        self._squares = torch.zeros(layer.in_features, dtype=torch.float32, device=layer.weight.device)

    def update(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        self._squares += flat.pow(2).sum(dim=0)

    @property
    def norms(self) -> torch.Tensor:
        return self._squares.sqrt()
