"""Textbook versions of magnitude, Wanda, SparseGPT and GPTQ: float64, one loop per definition, tiny layers only.

tests/test_compress.py shows that streaming gives what `method.compress` gives in memory; it cannot show that
`compress` does the maths of the papers, since both sides call it. These versions are written again from the
definitions (the papers, and README "Methods" and "Quantization" for our choices), slowly and plainly, and share
nothing with methods/ but the `Target` and `QuantSpec` records they read their settings from:

- magnitude: prune the smallest |W_ij| of the whole matrix, or of each row (`scope`), or n of every m in a row;
- Wanda (Sun et al., 2023): score |W_ij| · ‖X_j‖₂, prune the lowest within each output row (or m-group);
- SparseGPT (Frantar & Alistarh, 2023): H = 2XᵀX/n + λI (λ = 1% of mean diag H); U the upper Cholesky factor of
  H⁻¹ (H⁻¹ = UᵀU). Columns are visited one at a time; at the start of every block of B columns the mask of that
  block is chosen from w²/U_qq² (the paper's adaptive mask selection; for N:M, of every m columns when the sweep
  reaches them); column j is pruned (and rounded), its error e = (w_j − q_j)/U_jj updates every later column
  w_k -= e·U_jk at once: no lazy batching;
- GPTQ (Frantar et al., 2023): the same sweep without a mask, rounding onto the grid of README "Quantization", per
  row or per group, a group's grid fitted when the sweep reaches its first column; act-order visits columns by
  descending diag H.

Counts are the floor of fraction × weights (of the matrix, the row or the block), as methods/ promise
(`Method.pruned_count`). Loops run in Python over columns (and rows where the definition ranks them), with whole
rows updated at once: every row of W is its own least-squares problem with the same H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods import QuantSpec, Target


def lowest(scores: list[tuple[float, tuple[int, int]]], count: int) -> list[tuple[int, int]]:
    """The positions of the `count` lowest scores."""
    return [position for _, position in sorted(scores)[:count]]


def mask_of(shape: tuple[int, int], pruned: list[tuple[int, int]]) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    for row, column in pruned:
        mask[row, column] = True
    return mask


def prune_by_score(score: torch.Tensor, target: Target, scope: str) -> torch.Tensor:
    """Mask (True: pruned) of the lowest scores: of the matrix or of each row (`scope`), or n of every m."""
    rows, columns = score.shape
    if target.pattern is not None:
        n, m = target.pattern
        pruned = [position for row in range(rows) for start in range(0, columns, m)
                  for position in lowest([(score[row, c].item(), (row, c)) for c in range(start, start + m)], n)]
    elif scope == "matrix":
        pruned = lowest([(score[r, c].item(), (r, c)) for r in range(rows) for c in range(columns)],
                        math.floor(rows * columns * target.sparsity))
    else:
        pruned = [position for row in range(rows) for position in
                  lowest([(score[row, c].item(), (row, c)) for c in range(columns)],
                         math.floor(columns * target.sparsity))]
    return mask_of(score.shape, pruned)


def magnitude(weight: torch.Tensor, target: Target, scope: str = "matrix") -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight in float64, mask): the smallest |W|."""
    weight = weight.double()
    mask = prune_by_score(weight.abs(), target, scope)
    return weight.masked_fill(mask, 0.0), mask


def column_norms(inputs: torch.Tensor) -> torch.Tensor:
    """‖X_j‖₂ over every token: sqrt(Σ_t x_tj²)."""
    inputs = inputs.reshape(-1, inputs.shape[-1]).double()
    return torch.tensor([math.sqrt(sum(x * x for x in inputs[:, j].tolist())) for j in range(inputs.shape[1])],
                        dtype=torch.float64)


def wanda(weight: torch.Tensor, inputs: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight in float64, mask): the lowest |W_ij|·‖X_j‖₂ of each output row (or m-group)."""
    weight = weight.double()
    norms = column_norms(inputs)
    score = torch.tensor([[abs(weight[i, j].item()) * norms[j].item() for j in range(weight.shape[1])]
                          for i in range(weight.shape[0])], dtype=torch.float64)
    mask = prune_by_score(score, target, "row")
    return weight.masked_fill(mask, 0.0), mask


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2XᵀX/n over the n calibration tokens, in float64."""
    inputs = inputs.reshape(-1, inputs.shape[-1]).double()
    return 2 * inputs.T @ inputs / inputs.shape[0]


def upper_cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """U upper triangular with matrix = UᵀU, row by row (Cholesky–Banachiewicz on the transpose)."""
    a = matrix.tolist()
    n = len(a)
    u = [[0.0] * n for _ in range(n)]
    for i in range(n):
        u[i][i] = math.sqrt(a[i][i] - sum(u[k][i] ** 2 for k in range(i)))
        for j in range(i + 1, n):
            u[i][j] = (a[i][j] - sum(u[k][i] * u[k][j] for k in range(i))) / u[i][i]
    return torch.tensor(u, dtype=torch.float64)


def fit_grid(values: list[float], spec: QuantSpec, dtype: torch.dtype) -> tuple[float, int]:
    """README "Quantization": scale s and zero point z of one row or group, so that q in [0, 2^B − 1] stands for
    (q − z)·s. Symmetric: z = 2^(B−1), s = max|w| / (2^(B−1) − ½); asymmetric: the 2^B − 1 steps span
    [min(w, 0), max(w, 0)], z = round(−min/s). s is rounded to the layer's dtype before z is taken from it.
    An all-zero group may take any positive scale; like methods/quant.py we take the one of the span [−1, 1]."""
    low, high = min(min(values), 0.0), max(max(values), 0.0)
    if low == high == 0.0:
        low, high = -1.0, 1.0
    half = 2 ** (spec.bits - 1)
    if spec.symmetric:
        scale = max(-low, high) / (half - 0.5)
    else:
        scale = (high - low) / (2**spec.bits - 1)
    scale = max(torch.tensor(scale, dtype=torch.float64).to(dtype).item(), torch.finfo(dtype).tiny)
    zero = half if spec.symmetric else min(max(round(-low / scale), 0), 2**spec.bits - 1)
    return scale, zero


MIDPOINT = 2.0**-22  # relative distance from a midpoint that float rounding of the scale alone makes: 4 ulps


def round_onto(
    value: float, scale: float, zero: int, spec: QuantSpec, at_midpoint: int | None = None, slack: float = 0.0
) -> int:
    """The grid integer nearest to `value`, within [0, 2^B − 1].

    On the midpoint of two integers both are nearest: then `at_midpoint` is taken when given (it must be one of the
    two), else the even one. The symmetric grid puts −max|w| on a midpoint by construction (s = max|w| / (2^(B−1)
    − ½)), and which side it falls on is decided by nothing but the rounding of s to the layer's dtype and of the
    quotient (in float64, −7.5 comes out −7.4999999 or −7.5000001; in float32 either of those or −7.5 itself),
    so a value within MIDPOINT · |value| of a midpoint counts as on it; so does one within `slack` (in the weight's
    units: the precision to which a comparison knows the value)."""
    maxq = 2**spec.bits - 1
    x = value / scale
    below = math.floor(x)
    if abs(x - below - 0.5) * scale > max(slack, MIDPOINT * abs(value)):
        return min(max(round(x) + zero, 0), maxq)
    if at_midpoint is None:
        return min(max(below + below % 2 + zero, 0), maxq)
    nearest = {min(max(below + zero, 0), maxq), min(max(below + 1 + zero, 0), maxq)}
    assert at_midpoint in nearest, f"{value} / {scale} is halfway between {sorted(nearest)}, not near {at_midpoint}"
    return at_midpoint


@dataclass(frozen=True)
class Midpoints:
    """For comparing a method with the textbook: its grid integers (rows, columns), taken where a value lies on a
    midpoint (checked there to be one of the two nearest), and `slack`, the precision (in the weight's units) to
    which the comparison knows the values: a value within it of a midpoint is on one, as far as it can tell."""

    ints: torch.Tensor
    slack: float


@dataclass
class Swept:
    """A layer after the OBS sweep, in the original column order (float64): weight, mask (True: pruned), and on a
    grid its integers, the (rows, groups) scales and zero points, and every column's group."""

    weight: torch.Tensor
    mask: torch.Tensor
    ints: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None


def obs_sweep(
    weight: torch.Tensor, inputs: torch.Tensor, target: Target, blocksize: int, damping: float = 0.01,
    dtype: torch.dtype = torch.float32, midpoints: Midpoints | None = None,
) -> Swept:
    """SparseGPT (and with `target.quant`, joint pruning and rounding; without pruning, GPTQ) one column at a time.

    blocksize: columns per unstructured mask decision (it changes nothing else); dtype: what scales are rounded to;
    midpoints: how a comparison with a method settles values halfway between two grid integers (see Midpoints).
    Inputs never seen (H_jj = 0) have their weights zeroed and H_jj set to 1, so that H stays invertible.
    """
    w = weight.double().clone()
    rows, columns = w.shape
    h = hessian(inputs)
    for j in range(columns):
        if h[j, j] == 0:
            w[:, j] = 0.0
            h[j, j] = 1.0
    spec = target.quant
    order = list(range(columns))
    if spec is not None and spec.act_order:
        order = sorted(range(columns), key=lambda j: -h[j, j].item())
    static = grids_before_the_sweep(w, spec, dtype) if spec is not None else None
    grids: dict[int, tuple[list[float], list[int]]] = {}  # per group: every row's scale and zero point
    group_of = [0] * columns  # the group of every visit position
    if static is not None:
        group_of, grids = [static[0][column] for column in order], static[1]
    elif spec is not None:
        group_of = [position // spec.groupsize for position in range(columns)]
    w, h = w[:, order], h[order][:, order]
    chosen = None if midpoints is None else midpoints.ints.long()[:, order]
    slack = 0.0 if midpoints is None else midpoints.slack
    h += damping * h.diagonal().mean() * torch.eye(columns, dtype=torch.float64)
    u = upper_cholesky(torch.linalg.inv(h))

    mask = torch.zeros(rows, columns, dtype=torch.bool)
    ints = torch.zeros(rows, columns, dtype=torch.int64)
    for j in range(columns):
        if target.pattern is None and target.sparsity > 0 and j % blocksize == 0:
            end = min(j + blocksize, columns)
            saliency = [(w[r, c].item() ** 2 / u[c, c].item() ** 2, (r, c)) for r in range(rows) for c in range(j, end)]
            for r, c in lowest(saliency, math.floor(rows * (end - j) * target.sparsity)):
                mask[r, c] = True
        if target.pattern is not None and j % target.pattern[1] == 0:
            n, m = target.pattern
            for r in range(rows):
                for position in lowest([(w[r, c].item() ** 2 / u[c, c].item() ** 2, (r, c)) for c in range(j, j + m)],
                                       n):
                    mask[position] = True
        q = w[:, j].masked_fill(mask[:, j], 0.0)
        if spec is not None:
            if static is None and j % spec.groupsize == 0:
                grids[group_of[j]] = fit_rows(group_values(w, mask, u, j, spec.groupsize), spec, dtype)
            scales, zeros = grids[group_of[j]]
            for r in range(rows):
                choice = None if chosen is None else int(chosen[r, j])
                ints[r, j] = round_onto(q[r].item(), scales[r], zeros[r], spec, choice, slack)
                q[r] = (ints[r, j].item() - zeros[r]) * scales[r]
        error = (w[:, j] - q) / u[j, j]
        for k in range(j + 1, columns):
            w[:, k] -= error * u[j, k]
        w[:, j] = q

    restore = sorted(range(columns), key=lambda j: order[j])  # visit position of every original column
    swept = Swept(w[:, restore], mask[:, restore])
    if spec is not None:
        swept.scale = torch.tensor([grids[g][0] for g in sorted(grids)], dtype=torch.float64).T
        swept.zero = torch.tensor([grids[g][1] for g in sorted(grids)]).T
        swept.g_idx = torch.tensor([group_of[p] for p in restore])
        swept.ints = ints[:, restore]
    return swept


def fit_rows(values: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> tuple[list[float], list[int]]:
    """Every row's grid over the given columns."""
    fitted = [fit_grid(values[r].tolist(), spec, dtype) for r in range(values.shape[0])]
    return [s for s, _ in fitted], [z for _, z in fitted]


def grids_before_the_sweep(
    weight: torch.Tensor, spec: QuantSpec, dtype: torch.dtype
) -> tuple[list[int], dict[int, tuple[list[float], list[int]]]] | None:
    """Grids fitted on the weight before any column is visited: one per row, or with act-order "weight" one per
    group of consecutive original columns (group of every original column, grids); None when groups are fitted
    during the sweep (no act-order, or act-order "group": groups of consecutive visit positions)."""
    columns = weight.shape[1]
    if spec.groupsize is None:
        return [0] * columns, {0: fit_rows(weight, spec, dtype)}
    if spec.act_order != "weight":
        return None
    groups = range(0, columns, spec.groupsize)
    return ([j // spec.groupsize for j in range(columns)],
            {start // spec.groupsize: fit_rows(weight[:, start : start + spec.groupsize], spec, dtype)
             for start in groups})


def group_values(w: torch.Tensor, mask: torch.Tensor, u: torch.Tensor, start: int, groupsize: int) -> torch.Tensor:
    """What a group's grid is fitted on when the sweep reaches its first column (README: "to the weights the group
    keeps, its already chosen pruning done and compensated"): a copy of its columns as the sweep left them, in
    which every weight already chosen for pruning is, in visit order, set to 0 and its error spread over the
    group's later columns."""
    end = min(start + groupsize, w.shape[1])
    values = w[:, start:end].clone()
    for j in range(start, end):
        error = values[:, j - start].masked_fill(~mask[:, j], 0.0) / u[j, j]
        for k in range(j + 1, end):
            values[:, k - start] -= error * u[j, k]
        values[:, j - start].masked_fill_(mask[:, j], 0.0)
    return values


def sparsegpt(
    weight: torch.Tensor, inputs: torch.Tensor, target: Target, blocksize: int, dtype: torch.dtype = torch.float32,
    midpoints: Midpoints | None = None,
) -> Swept:
    """SparseGPT: the sweep with a mask chosen per block of `blocksize` columns (or per m), rounding the kept weights
    too when `target.quant` is set (joint compression)."""
    return obs_sweep(weight, inputs, target, blocksize, dtype=dtype, midpoints=midpoints)


def gptq(
    weight: torch.Tensor, inputs: torch.Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32,
    midpoints: Midpoints | None = None,
) -> Swept:
    """GPTQ: the sweep without pruning (so no block size: lazy batching only regroups the same updates)."""
    return obs_sweep(weight, inputs, Target(quant=spec), weight.shape[1], dtype=dtype, midpoints=midpoints)
