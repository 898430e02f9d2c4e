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


class Moments(Statistic):
    """Mean and variance of every input feature over all calibration tokens, in float64.

    Each micro-batch's own mean and sum of squared deviations are merged into the running ones with Chan et al.'s
    pairwise update, so no sum of squares of large activations is ever subtracted from another (the naive
    E[x²] − E[x]² loses every digit when |mean| ≫ std).
    """

    def __init__(self, layer: nn.Linear):
        shape, device = layer.in_features, layer.weight.device
        self.tokens = 0
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self._deviations = torch.zeros(shape, dtype=torch.float64, device=device)  # sum of (x − mean)²

    def update(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).double()
        count = flat.shape[0]
        if count == 0:
            return
        mean = flat.mean(dim=0)
        deviations = (flat - mean).pow(2).sum(dim=0)
        total = self.tokens + count
        delta = mean - self.mean
        self.mean += delta * (count / total)
        self._deviations += deviations + delta.pow(2) * (self.tokens * count / total)
        self.tokens = total

    @property
    def variance(self) -> torch.Tensor:
        """Population variance (divided by the token count)."""
        return self._deviations / max(self.tokens, 1)

    @property
    def mean_square(self) -> torch.Tensor:
        """E[x²] = variance + mean²."""
        return self.variance + self.mean.pow(2)
