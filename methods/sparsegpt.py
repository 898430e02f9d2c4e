"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning in one column sweep with lazy block updates.

Columns are visited left to right. Within a block of columns the mask is chosen from the OBS saliency
w² / [H⁻¹]_jj² (for N:M, every m columns and per row); each pruned column's error is spread over the columns not yet
visited through the row of the inverse-Hessian Cholesky factor, so the remaining weights compensate for it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from .base import LayerCost, LayerResult, Method, Statistic, Target
from .hessian import dead_inputs, inverse_cholesky
from .masks import check_pattern, lowest_overall, n_of_m
from .statistics import Gram


@dataclass
class SparseGPT(Method):
    """blocksize: columns per lazy-update block (and per mask decision); damping: λ as a fraction of mean diag H."""

    blocksize: int = 128
    damping: float = 0.01

    name = "sparsegpt"
    summary = "OBS pruning with weight updates from the inverse Hessian (the most accurate, the slowest)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--blocksize", type=int, default=128,
                            help="sparsegpt: columns per lazy-update block and mask decision (default: 128)")
        parser.add_argument("--damping", type=float, default=0.01,
                            help="sparsegpt: Hessian damping as a fraction of its mean diagonal (default: 0.01)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SparseGPT":
        return cls(blocksize=args.blocksize, damping=args.damping)

    def __post_init__(self) -> None:
        if self.blocksize < 1 or not 0 <= self.damping:
            raise ValueError(f"sparsegpt needs blocksize >= 1 and damping >= 0, got {self.blocksize}, {self.damping}")

    def statistic(self, layer: nn.Linear) -> Gram:
        return Gram(layer)

    def compress(self, layer: nn.Linear, statistic: Statistic | None, target: Target) -> LayerResult:
        assert isinstance(statistic, Gram)
        check_pattern(target, layer.in_features)
        if target.pattern is not None and self.blocksize % target.pattern[1]:
            raise ValueError(f"sparsegpt blocksize {self.blocksize} must be a multiple of m = {target.pattern[1]}")
        factor, damping = inverse_cholesky(statistic.gram, self.damping, statistic.scale)
        weight = layer.weight.detach().to(torch.float32, copy=True)
        weight[:, dead_inputs(statistic.gram)] = 0.0
        pruned, mask, loss = sweep(weight, factor, target, self.blocksize)
        return LayerResult(pruned.to(layer.weight.dtype), mask, {"loss": loss, "damping": damping})

    def layer_cost(self, rows: int, columns: int, dtype: torch.dtype, target: Target) -> LayerCost:
        """The factor (columns² float32), then in the sweep the float32 weight, its mask and the lazy update's
        product (up to the weight's size), or at the end the result in `dtype`; the column loop touches a
        rows × blocksize tile about ten times per column."""
        weight = rows * columns
        return LayerCost(
            working_bytes=4 * columns * columns + weight * max(9, 5 + dtype.itemsize),
            factored=columns,
            matmul_flops=float(rows) * columns * columns,
            factor_flops=4.0 / 3.0 * float(columns) ** 3,
            sequential_ops=10 * columns,
            sequential_bytes=6.0 * weight * self.blocksize,
            update_flops_per_token=2.0 * columns * columns,
            update_bytes_per_token=0 if dtype == torch.float32 else 4 * columns,
        )


def sweep(
    weight: torch.Tensor, factor: torch.Tensor, target: Target, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The OBS column sweep. weight: float32 (rows, cols), modified in place; factor: upper Cholesky of H⁻¹.

    Returns (pruned weight, prune mask, OBS loss estimate Σ (w − ŵ)² / [U]_jj² / 2).
    """
    rows, columns = weight.shape
    mask = torch.zeros_like(weight, dtype=torch.bool)
    loss = torch.zeros((), dtype=torch.float64, device=weight.device)
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        block = weight[:, start:end].clone()
        block_factor = factor[start:end, start:end]
        diagonal = block_factor.diagonal()
        errors = torch.zeros_like(block)
        block_mask = mask[:, start:end]
        if target.pattern is None:
            saliency = block.pow(2) / diagonal.pow(2).unsqueeze(0)
            block_mask[:] = lowest_overall(saliency, int(saliency.numel() * target.sparsity))
        for column in range(end - start):
            if target.pattern is not None and column % target.pattern[1] == 0:
                n, m = target.pattern
                window = block[:, column : column + m]
                saliency = window.pow(2) / diagonal[column : column + m].pow(2).unsqueeze(0)
                block_mask[:, column : column + m] = n_of_m(saliency, n, m)
            values = block[:, column]
            kept = values.masked_fill(block_mask[:, column], 0.0)
            error = (values - kept) / diagonal[column]
            loss += error.double().pow(2).sum() / 2
            block[:, column:] -= error.unsqueeze(1) * block_factor[column, column:].unsqueeze(0)
            block[:, column] = kept
            errors[:, column] = error
        weight[:, start:end] = block
        weight[:, end:] -= errors @ factor[start:end, end:]
    return weight, mask, float(loss)
