"""The inverse-Hessian factor shared by the OBS-style methods (SparseGPT, GPTQ)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("layerpress")

MAX_DAMPING_STEPS = 8
FIRST_RETRY_DAMPING = 1e-3  # where escalation starts when no damping was asked for


class NonInvertibleHessian(ValueError):
    """Even heavy damping did not make the Hessian positive definite (non-finite calibration activations)."""


def all_finite(matrix: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """torch.isfinite(matrix).all(), about `chunk` entries at a time: whole, it makes temporaries of 1.75× the
    matrix. The chunks' answers are combined on the device and read once (a read per chunk made the host wait for
    the device 579 times on a 49152-input Hessian)."""
    rows = max(1, chunk // max(matrix.shape[-1], 1))
    return bool(torch.stack([torch.isfinite(part).all() for part in matrix.split(rows)]).all())


def dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """Inputs never active in calibration (H_jj = 0): their weights are zeroed, their diagonal set to 1."""
    return hessian.diagonal() == 0


def scaled_copy(hessian: torch.Tensor, scale: float, order: torch.Tensor | None, out: torch.Tensor,
                chunk: int = 1 << 22) -> None:
    """out = scale · hessian, or scale · hessian[order][:, order]; the permuted copy is made about `chunk` entries
    at a time. H is symmetric, so a column chunk of the permuted matrix is the transpose of a row chunk:
    out[:, c] = H[order[c]][:, order]ᵀ, contiguous in the column-major `out`."""
    if order is None:
        torch.mul(hessian, scale, out=out)
        return
    columns = max(1, chunk // max(hessian.shape[0], 1))
    for start in range(0, hessian.shape[0], columns):
        rows = hessian.index_select(0, order[start : start + columns]).index_select(1, order)
        torch.mul(rows.T, scale, out=out[:, start : start + columns])


def invert_lower_triangular(matrix: torch.Tensor, leaf: int = 256, chunk: int = 1 << 24) -> None:
    """L ← L⁻¹ in place for a lower-triangular L (zeros above the diagonal), by halves: for L = [[A, 0], [B, C]],
    L⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]. The off-diagonal block's two products are plain float32 matrix products
    (2n³/3 flops over all levels, at the matmul rate rather than a solver's), over about `chunk` entries of it at
    a time: each row of B A⁻¹ needs only its own row of B, each column of C⁻¹ (B A⁻¹) only its own column."""
    size = matrix.shape[0]
    if size <= leaf:
        identity = torch.eye(size, dtype=matrix.dtype, device=matrix.device)
        matrix.copy_(torch.linalg.solve_triangular(matrix, identity, upper=False))
        return
    half = size // 2
    first, below, second = matrix[:half, :half], matrix[half:, :half], matrix[half:, half:]
    invert_lower_triangular(first, leaf, chunk)
    invert_lower_triangular(second, leaf, chunk)
    step = max(1, chunk // half)
    for start in range(0, size - half, step):
        rows = below[start : start + step]
        rows.copy_(rows @ first)
    for start in range(0, half, step):
        columns = below[:, start : start + step]
        columns.copy_(second @ columns).neg_()


def turn_half(matrix: torch.Tensor, chunk: int = 1 << 22) -> None:
    """M ← J M J in place (M[i, j] ← M[n−1−i, n−1−j]): row chunks of the top half swap with their mirror rows
    at the bottom, each reversed; a chunk of rows is copied at a time."""
    size = matrix.shape[0]
    step = max(1, chunk // max(size, 1))
    for start in range(0, size // 2, step):
        stop = min(start + step, size // 2)
        top = matrix[start:stop].clone()
        matrix[start:stop] = matrix[size - stop : size - start].flip(0, 1)
        matrix[size - stop : size - start] = top.flip(0, 1)
    if size % 2:
        middle = matrix[size // 2]
        middle.copy_(middle.flip(0))


def inverse_cholesky(
    hessian: torch.Tensor, damping: float, scale: float = 1.0, order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ for H = scale · `hessian`, λ = damping · mean(diag H); with `order`
    (act-order's permutation of the inputs), of the permuted H[order][:, order].

    With J the reversal of the inputs' order and J H J = L Lᵀ (lower Cholesky), H = (J L J)(J L J)ᵀ with J L J
    upper, so H⁻¹ = UᵀU for U = (J L J)⁻¹ = J L⁻¹ J: one factorization (n³/3) and a triangular inverse made of
    matrix products (2n³/3, `invert_lower_triangular`), where the reference's Cholesky, cholesky_inverse and
    second Cholesky take 4n³/3 in the solver (8192 inputs, one thread here: 6.7 → 5.3 s, and closer to a float64
    U). Dead inputs get H_jj = 1. `hessian` is left unchanged, and only one more n × n matrix is made: it is laid
    out column-major, the layout LAPACK works in, and every step overwrites it in place (out-of-place steps would
    hold two or three of them at once: for a 49152-input layer, 9.7 GB each); the reversed (and permuted) copy of
    H is written into it a chunk of columns at a time (a permuted copy beside it was 5.06 GiB more for OPT-66B's
    fc2). When the factorization fails the damping is raised tenfold and the failure logged, up to
    MAX_DAMPING_STEPS times; returns (U, damping actually used). Never returns NaN.
    """
    if not all_finite(hessian):
        raise NonInvertibleHessian("the Hessian has non-finite entries: the calibration activations overflowed")
    size = hessian.shape[0]
    reversed_order = (torch.arange(size - 1, -1, -1, device=hessian.device) if order is None else order.flip(0))
    diagonal = (hessian.diagonal() * scale)[reversed_order]
    diagonal.masked_fill_(diagonal == 0, 1.0)
    mean_diagonal = diagonal.mean()
    work = torch.empty_strided((size, size), (1, size), dtype=hessian.dtype, device=hessian.device)
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    for _ in range(MAX_DAMPING_STEPS):
        scaled_copy(hessian, scale, reversed_order, work)
        work.diagonal().copy_(diagonal + damping * mean_diagonal)
        torch.linalg.cholesky_ex(work, out=(work, info))
        if info.item() == 0:
            invert_lower_triangular(work)
            turn_half(work)
            if all_finite(work):
                return work, damping
        raised = max(damping * 10, FIRST_RETRY_DAMPING)
        log.warning("Hessian not positive definite with damping %.3g; retrying with %.3g", damping, raised)
        tried, damping = damping, raised
    raise NonInvertibleHessian(f"the Hessian stays singular even with damping {tried:.3g}")
