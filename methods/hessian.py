"""The inverse-Hessian factor shared by the OBS-style methods (SparseGPT, GPTQ)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("layerpress")

MAX_DAMPING_STEPS = 8
FIRST_RETRY_DAMPING = 1e-3  # where escalation starts when no damping was asked for


class NonInvertibleHessian(ValueError):
    """Even heavy damping did not make the Hessian positive definite (non-finite calibration activations)."""


def prepare(hessian: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of H and W with dead inputs (never active in calibration) made harmless: H_jj = 1, W[:, j] = 0."""
    if not torch.isfinite(hessian).all():
        raise NonInvertibleHessian("the Hessian has non-finite entries: the calibration activations overflowed")
    hessian = hessian.clone()
    weight = weight.clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    return hessian, weight


def inverse_cholesky(hessian: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damping · mean(diag H).

    When a factorization fails the damping is raised tenfold and the failure logged, up to MAX_DAMPING_STEPS times;
    returns (U, damping actually used). Never returns NaN.
    """
    mean_diagonal = hessian.diagonal().mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(MAX_DAMPING_STEPS):
        damped = hessian + (damping * mean_diagonal) * eye
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper, damping
        raised = max(damping * 10, FIRST_RETRY_DAMPING)
        log.warning("Hessian not positive definite with damping %.3g; retrying with %.3g", damping, raised)
        tried, damping = damping, raised
    raise NonInvertibleHessian(f"the Hessian stays singular even with damping {tried:.3g}")
