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


def inverse_cholesky(
    hessian: torch.Tensor, damping: float, scale: float = 1.0, order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ for H = scale · `hessian`, λ = damping · mean(diag H); with `order`
    (act-order's permutation of the inputs), of the permuted H[order][:, order].

    Dead inputs get H_jj = 1. `hessian` is left unchanged, and only one more n × n matrix is made: it is laid out
    column-major, the layout LAPACK works in, so the factorization, the inverse and the second factorization all
    overwrite it in place (three out-of-place steps would hold two or three of them at once: for a 49152-input
    layer, 9.7 GB each). The permutation is written into it a chunk of columns at a time: a permuted copy of H
    beside it was one more n × n matrix (5.06 GiB for OPT-66B's fc2). When a factorization fails the damping is
    raised tenfold and the failure logged, up to MAX_DAMPING_STEPS times; returns (U, damping actually used).
    Never returns NaN.
    """
    if not all_finite(hessian):
        raise NonInvertibleHessian("the Hessian has non-finite entries: the calibration activations overflowed")
    size = hessian.shape[0]
    diagonal = hessian.diagonal() * scale
    if order is not None:
        diagonal = diagonal[order]
    diagonal.masked_fill_(diagonal == 0, 1.0)
    mean_diagonal = diagonal.mean()
    work = torch.empty_strided((size, size), (1, size), dtype=hessian.dtype, device=hessian.device)
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    for _ in range(MAX_DAMPING_STEPS):
        scaled_copy(hessian, scale, order, work)
        work.diagonal().copy_(diagonal + damping * mean_diagonal)
        torch.linalg.cholesky_ex(work, out=(work, info))
        if info.item() == 0:
            torch.cholesky_inverse(work, out=work)
            torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
            if info.item() == 0 and all_finite(work):
                return work, damping
        raised = max(damping * 10, FIRST_RETRY_DAMPING)
        log.warning("Hessian not positive definite with damping %.3g; retrying with %.3g", damping, raised)
        tried, damping = damping, raised
    raise NonInvertibleHessian(f"the Hessian stays singular even with damping {tried:.3g}")
