"""CPTQuant's three layer sensitivities (Nanda et al., 2024), each read from the layer's Gram matrix alone.

The paper publishes no code; these are our readings, all scale-free (a layer's number does not grow with the size
of its activations, so layers of every depth compare) and computed from H = 2·XᵀX/N (uncentered second moments: the
score pass's statistic) and the weight W, with Y = XWᵀ the layer's output. Higher means more sensitive.

- CMPQ, canonical correlation: 1 − the mean canonical correlation between the input X and the output observed under
  isotropic noise, Y + e with e ~ N(0, λI), λ = `noise` · the mean output variance (tr(WHWᵀ)/rows). Without noise
  the correlations are all 1 (Y is a linear function of X); the noise stands for the quantization error a layer's
  output receives. Along an eigenvector of the output's second moments WHWᵀ with eigenvalue s the canonical
  correlation is √(s / (s + λ)), so a layer whose output lives in few strong directions, leaving many weak ones that
  such noise drowns, has low correlation: sensitive. min(rows, columns) correlations.
- PMPQ, pruning: the relative output error ‖(W − W_p)X‖² / ‖WX‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) when the layer is
  magnitude-pruned (smallest |W| of the whole matrix, no reconstruction) at the probe sparsity.
- TDMPQ, Taylor: for y = Wx the first-order Taylor expansion is exact, Δy = Wδ; with δ_j = ε·σ_j·n_j (n ~ N(0, 1),
  σ_j² = E[x_j²]) the expected ‖Wδ‖² / ε² relative to ‖Wx‖² is Σ_j H_jj ‖W_:,j‖² / tr(W H Wᵀ). ε cancels. The same
  number is the relative output error of multiplicative weight noise ΔW_ij = ε·W_ij·n_ij, the shape of rounding
  error that scales with the weights. It is large where the input channels' contributions cancel in the output.
"""

from __future__ import annotations

import torch

from .masks import lowest_overall

POLICIES = ("cmpq", "pmpq", "tdmpq")


def output_second_moments(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """The nonzero spectrum of W H Wᵀ (float64, min(rows, columns) eigenvalues, ascending), from the smaller side."""
    rows, columns = weight.shape
    if rows <= columns:
        return torch.linalg.eigvalsh(weight @ hessian @ weight.T)
    values, vectors = torch.linalg.eigh(hessian)
    root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T  # H^½: W H Wᵀ and H^½ WᵀW H^½ share eigenvalues
    gram = weight.T @ weight
    return torch.linalg.eigvalsh(root @ gram @ root)


def canonical_sensitivity(weight: torch.Tensor, hessian: torch.Tensor, noise: float) -> float:
    """CMPQ: 1 − mean canonical correlation of X and XWᵀ + e, e isotropic at `noise` × the mean output variance."""
    weight, hessian = weight.double(), hessian.double()
    spectrum = output_second_moments(weight, hessian).clamp(min=0)
    level = noise * float((weight @ hessian * weight).sum()) / weight.shape[0]
    if level <= 0:  # a layer that outputs nothing: no signal to lose
        return 0.0
    return float(1 - (spectrum / (spectrum + level)).sqrt().mean())


def output_energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(W H Wᵀ) = 2‖WX‖²/N."""
    return float((weight.double() @ hessian.double() * weight.double()).sum())


def pruning_sensitivity(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float) -> float:
    """PMPQ: ‖(W − W_p)X‖² / ‖WX‖² with W_p magnitude-pruned at `sparsity` (no reconstruction)."""
    removed = weight * lowest_overall(weight.abs(), int(weight.numel() * sparsity))
    return output_energy(removed, hessian) / max(output_energy(weight, hessian), 1e-300)


def taylor_sensitivity(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """TDMPQ: E‖Wδ‖² / ‖WX‖² for δ_j = σ_j·n_j, σ_j² = E[x_j²]: Σ_j H_jj ‖W_:,j‖² / tr(W H Wᵀ)."""
    diagonal = float((weight.double().pow(2).sum(dim=0) * hessian.diagonal().double()).sum())
    return diagonal / max(output_energy(weight, hessian), 1e-300)
