"""The integer grid shared by rtn, gptq and sparsegpt --wbits: fitting it, rounding onto it, reading it back.

A layer's weights are quantized per output row, either over the whole row or per group of `groupsize` input
columns. Group g of row r has a scale s > 0 and an integer zero point z in [0, 2^bits − 1]; an integer q in the same
range stands for the weight (q − z)·s. The grid always holds 0 exactly (q = z), so pruned weights stay zero.
Symmetric grids have z = 2^(bits−1) and s = max|w| / (2^(bits−1) − ½) (the compressed-tensors convention: signed
integers q − z in [−2^(bits−1), 2^(bits−1) − 1], no stored zero point); asymmetric grids span
[min(w, 0), max(w, 0)].
Scales are rounded to the layer's dtype when fitted, so the grid a method rounds onto is exactly the one stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = tuple(range(2, 9))  # every width compressed-tensors packs (dense bit streams, 2 to 8)
ACT_ORDERS = ("weight", "group")


@dataclass(frozen=True)
class QuantSpec:
    """How a layer's weights must be quantized.

    bits: integer width; groupsize: input columns per scale (None: one scale per output row); symmetric: zero point
    fixed at the middle of the range; act_order: columns visited by descending Hessian diagonal (gptq, sparsegpt),
    with groups kept contiguous in the original column order ("weight") or formed along the visit order ("group",
    which needs a g_idx to say which group every column belongs to).
    """

    bits: int
    groupsize: int | None = None
    symmetric: bool = True
    act_order: str | None = None

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"quantization to {self.bits} bits is not supported; choose one of {BITS}")
        if self.groupsize is not None and self.groupsize < 1:
            raise ValueError(f"the group size must be at least 1, got {self.groupsize}")
        if self.act_order not in (None, *ACT_ORDERS):
            raise ValueError(f"act-order must be one of {ACT_ORDERS}, got {self.act_order!r}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def permuted_groups(self) -> bool:
        """Whether groups follow the act-order visit order, so that the layer needs a g_idx."""
        return self.act_order == "group" and self.groupsize is not None

    def groups(self, columns: int) -> int:
        return 1 if self.groupsize is None else -(-columns // self.groupsize)


def fit(values: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32, representable in `dtype`) and zero point (int64) over the last dimension of `values`
    (rows, n), or (rows, groups, n) for many groups at once."""
    values = values.float()
    low = values.min(dim=-1).values.clamp(max=0)
    high = values.max(dim=-1).values.clamp(min=0)
    if spec.symmetric:
        high = torch.maximum(-low, high)
        low = -high
    empty = (low == 0) & (high == 0)  # an all-zero row or group: any positive scale will do
    low, high = low.masked_fill(empty, -1.0), high.masked_fill(empty, 1.0)
    scale = ((high - low) / spec.maxq).to(dtype).float().clamp(min=torch.finfo(dtype).tiny)
    if spec.symmetric:
        zero = torch.full_like(scale, (spec.maxq + 1) // 2, dtype=torch.int64)
    else:
        zero = torch.round(-low / scale).clamp(0, spec.maxq).to(torch.int64)
    return scale, zero


def grid_levels(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The grid integers nearest to `values`, clamped to the range, as float32 (exact: at most 255); scale and zero
    (int or float) broadcast to the shape of `values`. Four kernels on one new tensor: the sweep rounds a column at
    a time, and keeps these to write the integers and the values they stand for without converting back."""
    return torch.div(values.float(), scale).round_().add_(zero).clamp_(0, spec.maxq)


def quantize(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The grid integers (uint8) nearest to `values`, clamped to the range; scale and zero broadcast."""
    return grid_levels(values, scale, zero, spec).to(torch.uint8)


def dequantize(ints: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q − z)·s in float32; scale and zero broadcast."""
    return (ints.float() - zero.float()) * scale.float()


def contiguous_groups(columns: int, spec: QuantSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """g_idx of consecutive groups: column j belongs to group j // groupsize (all to group 0 without groups), made
    on `device` (the weight's, not the host's, when it is fitted there)."""
    if spec.groupsize is None:
        return torch.zeros(columns, dtype=torch.int64, device=device)
    return torch.arange(columns, device=device) // spec.groupsize


def fit_groups(weight: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (rows, groups) of consecutive groups of columns (`contiguous_groups`), all whole groups
    fitted at once on a view of the weight, then a last smaller one. (Picking each group's columns by a boolean
    mask made the host wait for the device once per group.)"""
    rows, columns = weight.shape
    size = min(spec.groupsize or columns, columns)
    whole = columns // size
    fitted = [fit(weight[:, : whole * size].reshape(rows, whole, size), spec, dtype)]
    if whole * size < columns:
        scale, zero = fit(weight[:, whole * size :], spec, dtype)
        fitted.append((scale.unsqueeze(1), zero.unsqueeze(1)))
    return torch.cat([scale for scale, _ in fitted], dim=1), torch.cat([zero for _, zero in fitted], dim=1)


@dataclass
class QuantRecord:
    """A layer on its grid: weight[:, j] = (ints[:, j] − zero[:, g]) · scale[:, g] with g = g_idx[j].

    ints: uint8 (rows, columns); scale: (rows, groups) in the layer's dtype; zero: uint8 (rows, groups);
    g_idx: int64 (columns,), the group of every column (contiguous unless act_order is "group").
    """

    spec: QuantSpec
    ints: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The weight these integers stand for, in the scale's dtype (the layer's)."""
        return read_grid(self.ints, self.scale, self.zero, self.g_idx)

    @staticmethod
    def nbytes_for(rows: int, columns: int, spec: QuantSpec, dtype: torch.dtype) -> int:
        """Memory of the record of a (rows, columns) layer of `dtype`, for the memory planner."""
        return rows * columns + rows * spec.groups(columns) * (dtype.itemsize + 1) + columns * 8


# Values dequantized at once. Whole, a layer's gathered scales and zero points and its float32 steps make about
# 24 bytes a weight at once: 8 GB for OPT-66B's fc2, which took a 16.9 GiB joint sparsegpt + 4-bit run past 21 GiB.
GRID_CHUNK_VALUES = 2**24
GRID_CHUNK_BYTES = 24 * GRID_CHUNK_VALUES  # what one chunk's steps hold at once, for the planner


def read_grid(ints: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Dense weight of grid integers (rows, columns), rounded once from float32 to the scale's dtype, over chunks of
    rows (each value is computed alone: the chunks change nothing).

    Every writer of dense weights and every reader of packed ones goes through here, so they agree bit for bit.
    """
    g_idx = g_idx.long()
    rows, columns = ints.shape
    weight = torch.empty(rows, columns, dtype=scale.dtype, device=ints.device)
    step = max(1, GRID_CHUNK_VALUES // max(columns, 1))
    for start in range(0, rows, step):
        part = slice(start, start + step)
        weight[part] = dequantize(ints[part], scale[part][:, g_idx], zero[part][:, g_idx]).to(scale.dtype)
    return weight


def round_to_nearest(weight: torch.Tensor, spec: QuantSpec) -> QuantRecord:
    """Round-to-nearest onto grids fitted on `weight` itself (contiguous groups, no error compensation)."""
    g_idx = contiguous_groups(weight.shape[1], spec, weight.device)
    scale, zero = fit_groups(weight, spec, weight.dtype)
    ints = quantize(weight, scale[:, g_idx], zero[:, g_idx], spec)
    return QuantRecord(spec, ints, scale.to(weight.dtype), zero.to(torch.uint8), g_idx)
