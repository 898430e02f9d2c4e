"""The OBS column sweep shared by SparseGPT and GPTQ: prune and/or quantize a layer column by column.

Columns are visited left to right (or by descending Hessian diagonal with act-order). Each column is first pruned
(its weights in the mask set to zero; the mask is chosen per block of columns from the OBS saliency w² / [H⁻¹]_jj²,
or per m columns for N:M), then its kept weights are rounded onto the quantization grid; the error of both is spread
over the columns not yet visited through the same row of the inverse-Hessian Cholesky factor, so the remaining
weights compensate for it. Updates to columns beyond the current block are applied lazily, once per block.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from .base import LayerCost, LayerResult, Method, Statistic, Target
from .hessian import dead_inputs, inverse_cholesky
from .masks import check_pattern, lowest_overall, n_of_m
from .quant import GRID_CHUNK_BYTES, QuantRecord, QuantSpec, contiguous_groups, fit, fit_groups, grid_levels
from .statistics import GRAM_DTYPES, Gram, check_gram_dtype, resolve_gram_dtype


class SweepGrid:
    """The quantization grid of one layer during a sweep, in sweep (visit) order.

    Grids of whole rows, and of groups with act-order "weight" (groups of the original column order), are fitted
    on the weight before the sweep; other groups are consecutive in visit order and fitted when the sweep reaches
    their first column, on the weights as earlier columns' errors left them (GPTQ's lazy grouping). Zero points are
    kept as float32 (exact small integers), so rounding a column converts nothing.
    """

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, order: torch.Tensor | None, dtype: torch.dtype):
        rows, columns = weight.shape
        self.spec, self.dtype = spec, dtype
        natural = contiguous_groups(columns, spec, weight.device)
        static = spec.groupsize is None or (order is not None and spec.act_order == "weight")
        self.group = natural[order] if static and order is not None else natural  # group of each visit position
        self._group_of = self.group.tolist()  # one read per layer, so that no column waits on the device
        self.lazy = not static
        self.scale = torch.ones(rows, spec.groups(columns), device=weight.device)
        self.zero = torch.zeros(rows, spec.groups(columns), device=weight.device)
        if static:
            original = weight if order is None else weight[:, torch.argsort(order)]
            self.scale, zero = fit_groups(original, spec, dtype)
            self.zero = zero.float()
        self.ints = torch.empty(rows, columns, dtype=torch.uint8, device=weight.device)

    def group_width(self, position: int) -> int:
        """Columns of the group that starts at visit `position` and must be fitted now (0: none starts here)."""
        if not self.lazy or position % self.spec.groupsize:
            return 0
        return min(self.spec.groupsize, self.ints.shape[1] - position)

    def fit_group(self, position: int, values: torch.Tensor) -> None:
        group = self._group_of[position]
        self.scale[:, group], self.zero[:, group] = fit(values, self.spec, self.dtype)

    def round(self, position: int, values: torch.Tensor, out: torch.Tensor) -> None:
        """Round one column onto its group's grid: records the integers, writes the values they stand for into
        `out` ((q − z)·s, as `dequantize` computes it from the stored integers)."""
        group = self._group_of[position]
        scale, zero = self.scale[:, group], self.zero[:, group]
        levels = grid_levels(values, scale, zero, self.spec)
        self.ints[:, position] = levels
        torch.mul(levels.sub_(zero), scale, out=out)

    def record(self, restore: torch.Tensor | None) -> QuantRecord:
        """The grid in the original column order (`restore`: visit position of every original column)."""
        ints, group = (self.ints, self.group) if restore is None else (self.ints[:, restore], self.group[restore])
        return QuantRecord(self.spec, ints, self.scale.to(self.dtype), self.zero.to(torch.uint8), group)


def sweep(
    weight: torch.Tensor, factor: torch.Tensor, target: Target, blocksize: int, grid: SweepGrid | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The OBS column sweep. weight: float32 (rows, cols), modified in place; factor: upper Cholesky of H⁻¹.

    Returns (compressed weight, prune mask, OBS loss estimate Σ (w − ŵ)² / [U]_jj² / 2).

    Nothing in it reads a device value on the host but the loss, once at the end: a read per column (a test of a
    mask, a scalar) would make a GPU wait for every column's kernels before launching the next ones. A column's
    error is written straight into the block's error matrix and only the later columns get the rank-1 update; the
    pruned weights are zeroed, and the loss summed from the error matrix, once per block; a grid's rounding writes
    into the block's result. Kernels per column: 3 pruning, 11 on a grid, 18 pruning into groups (before: 13, 23,
    33; `kernels_per_column`); the results are bit for bit those of before (tools/sweep_identity.py).
    """
    rows, columns = weight.shape
    prunes = not target.is_dense
    mask = torch.zeros_like(weight, dtype=torch.bool)
    losses = torch.empty(columns, dtype=torch.float64, device=weight.device)  # Σ error² of every column
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        # The block is worked on transposed, a column of the weight a contiguous row of `block`: the rank-1 update of
        # the later columns and each column's reads were strided in the weight's own layout (576 rows × 128 columns,
        # 2 threads: 40 against 23 µs a column; 1536 rows: 199 against 34). The same elementwise operations, so the
        # same bits (tools/sweep_identity.py).
        block = weight[:, start:end].T.contiguous()
        block_factor = factor[start:end, start:end].contiguous()  # row-major: a column's update reads one of its rows
        diagonal = block_factor.diagonal()
        errors = torch.zeros_like(block)
        rounded = None if grid is None else torch.empty_like(block)
        block_mask = torch.zeros_like(block, dtype=torch.bool)
        # Pruning alone: a column's error (w − w·[kept]) / d is w / d for the pruned weights and zero for the kept
        # ones, one division by d or by ∞ (w / ∞ = 0, finite w) instead of a selection and a division per column
        divisors = diagonal.unsqueeze(1).expand_as(block).clone() if rounded is None and prunes else None
        if target.pattern is None and prunes:
            saliency = block.T.pow(2) / diagonal.pow(2).unsqueeze(0)  # rows × columns, as the selection counts ties
            block_mask.T.copy_(lowest_overall(saliency, int(saliency.numel() * target.sparsity)))
            if divisors is not None:
                divisors.masked_fill_(block_mask.logical_not(), torch.inf)
        for column in range(end - start):
            if target.pattern is not None and column % target.pattern[1] == 0:
                n, m = target.pattern
                window = block[column : column + m].T
                saliency = window.pow(2) / diagonal[column : column + m].pow(2).unsqueeze(0)
                block_mask[column : column + m].T.copy_(n_of_m(saliency, n, m))
                if divisors is not None:
                    divisors[column : column + m].masked_fill_(block_mask[column : column + m].logical_not(), torch.inf)
            values, error, pruned = block[column], errors[column], block_mask[column]
            if divisors is not None:
                torch.div(values, divisors[column], out=error)
            elif rounded is not None:  # (neither: a layer allocated 0% without a grid, whose errors stay zero)
                kept = values.masked_fill(pruned, 0.0) if prunes else values
                position = start + column
                if width := grid.group_width(position):
                    current = _group_values(weight, block.T, block_mask.T, errors.T, factor, start, column, width, prunes)
                    grid.fit_group(position, current)
                grid.round(position, kept, out=rounded[column])
                torch.sub(values, rounded[column], out=error).div_(diagonal[column])
            block[column + 1 :].sub_(block_factor[column, column + 1 :].unsqueeze(1) * error.unsqueeze(0))
        # Σ e² of each column in float64, a contiguous row each (as a per-column loop summed them: on the CPU bit for
        # bit the same up to 32768 rows, torch's grain for splitting a sum over threads), added up in column order
        # by the scan at the end, as that loop accumulated them
        losses[start:end] = errors.to(torch.float64).pow_(2).sum(dim=1)
        mask[:, start:end] = block_mask.T
        weight[:, start:end] = (block.masked_fill_(block_mask, 0.0) if rounded is None else rounded).T
        weight[:, end:].sub_(errors.T @ factor[start:end, end:])
    return weight, mask, float(losses.cumsum(0)[-1]) / 2 if columns else 0.0


def _group_values(
    weight: torch.Tensor, block: torch.Tensor, block_mask: torch.Tensor, errors: torch.Tensor, factor: torch.Tensor,
    start: int, column: int, width: int, prunes: bool,
) -> torch.Tensor:
    """The `width` columns from block column `column` on, as near as can be known before their grid exists to what
    the sweep will round: every error made so far applied (also the lazy updates still pending past the block), then
    the pruning already chosen among them done and compensated within the group, over all its columns (a group that
    runs past the block gets the compensation there too, so that the block size does not change the grid). The grid
    is fitted to the weights the group keeps, not to the ones it is about to lose or to their pre-compensation
    values. (Every column's pruning is applied whether or not it prunes anything: testing that would wait on the
    device. Without pruning the target says so, and the loop is skipped.)"""
    end = start + block.shape[1]
    stop = min(column + width, block.shape[1])
    values = block[:, column:stop].clone(memory_format=torch.contiguous_format)
    beyond = start + column + width - end
    if beyond > 0:
        pending = errors[:, :column] @ factor[start : start + column, end : end + beyond]
        values = torch.cat([values, weight[:, end : end + beyond] - pending], dim=1)
    first = start + column
    # the group's columns past the block have no mask yet: only those inside it prune
    for offset, pruned in enumerate(block_mask[:, column:stop].T if prunes else ()):
        row = factor[first + offset, first + offset : first + width]
        error = torch.where(pruned, values[:, offset], 0.0) / row[0]
        values[:, offset + 1 :].sub_(error.unsqueeze(1) * row[1:].unsqueeze(0))
        values[:, offset].masked_fill_(pruned, 0.0)
    return values


@dataclass
class HessianSweep(Method):
    """A method built on the OBS sweep. blocksize: columns per lazy-update block (and per mask decision);
    damping: λ as a fraction of mean diag H; gram_dtype: how XᵀX is accumulated (methods/statistics.py: Gram;
    "auto" follows the block's dtype)."""

    blocksize: int = 128
    damping: float = 0.01
    gram_dtype: str = "auto"

    quantizes = True
    statistic_per_input = True  # the Gram of the inputs; compress factorizes a copy (inverse_cholesky)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--blocksize", type=int, default=128,
                            help="sparsegpt, gptq: columns per lazy-update block and mask decision (default: 128)")
        parser.add_argument("--damping", type=float, default=0.01,
                            help="sparsegpt, gptq: Hessian damping as a fraction of its mean diagonal (default: 0.01)")
        parser.add_argument("--gram-dtype", choices=GRAM_DTYPES, default="auto",
                            help="sparsegpt, gptq: how the Hessian's X^T X is accumulated, always into a float32 sum: "
                            "float32; tf32 (TF32 tensor cores on CUDA, float32 on a CPU); bfloat16 (inputs rounded "
                            "to bfloat16, products in chunks of 1024 tokens: about 2x faster on a CPU with "
                            "AVX512-BF16, relative error ~5e-4 of the Gram's norm: fine for sparsegpt, but gptq w4 "
                            "is 6.6%% worse on SmolLM2); auto: no input rounded, by the dtype the blocks compute in "
                            "(--dtype, or the checkpoint's): tf32 for bfloat16 and float16, float32 for float32 "
                            "(default: auto)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "HessianSweep":
        return cls(blocksize=args.blocksize, damping=args.damping, gram_dtype=args.gram_dtype)

    def __post_init__(self) -> None:
        if self.blocksize < 1 or not 0 <= self.damping:
            raise ValueError(f"{self.name} needs blocksize >= 1 and damping >= 0, got {self.blocksize}, {self.damping}")
        check_gram_dtype(self.gram_dtype)

    def settings(self) -> dict:
        """The float32 Gram leaves the record as it was before gram_dtype existed, so older partial runs resume."""
        settings = super().settings()
        if settings["gram_dtype"] == "float32":
            del settings["gram_dtype"]
        return settings

    def check(self, target: Target) -> None:
        super().check(target)
        if target.pattern is not None and self.blocksize % target.pattern[1]:
            raise ValueError(f"{self.name} blocksize {self.blocksize} must be a multiple of m = {target.pattern[1]}")
        if target.pattern is not None and target.quant is not None and target.quant.act_order:
            raise ValueError("act-order reorders columns, which breaks N:M groups; use one or the other")

    def pruned_count(self, rows: int, columns: int, target: Target) -> int:
        if target.pattern is not None:
            n, m = target.pattern
            return rows * (columns // m) * n
        return sum(int(rows * (min(start + self.blocksize, columns) - start) * target.sparsity)
                   for start in range(0, columns, self.blocksize))

    def statistic(self, layer: nn.Linear) -> Gram:
        return Gram(layer, self.gram_dtype)

    def compress(self, layer: nn.Linear, statistic: Statistic | None, target: Target) -> LayerResult:
        assert isinstance(statistic, Gram)
        self.check(target)
        check_pattern(target, layer.in_features)
        weight = layer.weight.detach().to(torch.float32, copy=True)
        weight.masked_fill_(dead_inputs(statistic.gram), 0.0)
        spec = target.quant
        order = None
        if spec is not None and spec.act_order:
            order = torch.argsort(statistic.gram.diagonal(), descending=True)
            weight = weight[:, order]
        factor, damping = inverse_cholesky(statistic.gram, self.damping, statistic.scale, order)
        grid = SweepGrid(weight, spec, order, layer.weight.dtype) if spec is not None else None
        compressed, mask, loss = sweep(weight, factor, target, self.blocksize, grid)
        restore = None if order is None else torch.argsort(order)
        if restore is not None:
            compressed, mask = compressed[:, restore], mask[:, restore]
        info = {"loss": loss, "damping": damping}
        if grid is None:
            return LayerResult(compressed.to(layer.weight.dtype), mask, info)
        record = grid.record(restore)
        return LayerResult(record.dequantize(), mask, info, record)

    def layer_cost(self, rows: int, columns: int, dtype: torch.dtype, target: Target) -> LayerCost:
        """The factor (columns² float32), then in the sweep the float32 weight, its mask and the lazy update's
        product (up to the weight's size), or at the end the result in `dtype` (act-order permutes the Gram into the
        factor, a chunk at a time: no more columns² matrices); a grid's weight is read back a chunk of rows at a time
        (`read_grid`); the column loop launches a few
        kernels per column (`kernels_per_column`) on a rows × blocksize tile. A quantization grid adds a byte per
        weight. The mask (and the grid integers) are kept with the result. The statistic's update is the Gram's."""
        weight = rows * columns
        kept = weight + (QuantRecord.nbytes_for(rows, columns, target.quant, dtype) if target.quant else 0)
        dequantized = GRID_CHUNK_BYTES if target.quant is not None else 0  # the grid's weight, a chunk at a time
        precision = resolve_gram_dtype(self.gram_dtype, dtype)
        return LayerCost(
            working_bytes=4 * columns * columns + dequantized
            + weight * (max(9, 5 + dtype.itemsize) + (target.quant is not None)),
            kept_bytes=kept,
            factored=columns,
            # the sweep's lazy updates and the factor's triangular inverse are matrix products; the solver
            # factorizes once (methods/hessian.inverse_cholesky)
            matmul_flops=float(rows) * columns * columns + 2.0 / 3.0 * float(columns) ** 3,
            factor_flops=float(columns) ** 3 / 3.0,
            sequential_ops=kernels_per_column(target) * columns,
            sequential_bytes=6.0 * weight * self.blocksize,
            update_flops_per_token=Gram.update_flops_per_token(columns, precision),
            update_bytes_per_token=Gram.update_bytes_per_token(columns, dtype, precision),
            update_precision=precision,
            update_moved_bytes_per_token=Gram.update_moved_bytes_per_token(columns, precision),
        )


def kernels_per_column(target: Target) -> int:
    """Kernels the sweep launches per column for `target` (tests/test_sync_count.py counts them by dispatch, within
    one): 3 pruning (4 before its error became one division), 2 more for N:M masks (chosen every m columns), 11 on
    a grid (12 also pruning), 6 more pruning into lazy groups (whose fit first replays the group's pruning). Before
    the sweep lost its host reads: 13, 15, 23, 33 for pruning, N:M, a grid and pruning into groups."""
    spec, prunes = target.quant, not target.is_dense
    lazy_groups = spec is not None and spec.groupsize is not None and spec.act_order != "weight"
    return (3 if spec is None else 11 + prunes) + 2 * (target.pattern is not None) + 6 * (lazy_groups and prunes)
