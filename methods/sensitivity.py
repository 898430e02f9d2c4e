"""CPTQuant's layer sensitivities (Nanda et al., 2024). Higher means more sensitive.

The paper publishes no code. CMPQ "adapts the precision level based on canonical correlation analysis of different
layers": it compares layers, so our reading of the paper's measure (`cmpq`) is taken between a transformer block's
input and output hidden states, the representations of two consecutive layers:

- CMPQ (the paper's, as we read it): 1 − the mean canonical correlation between the block's input X and its output
  Y over all calibration tokens (centered; `BlockCorrelation`). A block that keeps its input's directions (Y ≈ X +
  small) scores near 0; one that rewrites the representation scores high. Every linear layer of the block gets its
  block's number. A canonical correlation between a layer's input and its own linear output, the literal per-layer
  version, is identically 1 (Y = XWᵀ is a linear function of X), which is why the next measure needs a noise level.

The others are ours: scale-free (a layer's number does not grow with the size of its activations, so layers of
every depth compare) and computed from H = 2·XᵀX/N (uncentered second moments: the score pass's statistic) and the
weight W, with Y = XWᵀ the layer's output.

- cmpq-noise (ours, a per-layer stand-in for CMPQ): 1 − the mean canonical correlation between the input X and the output observed under
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

from collections.abc import Callable

import torch

from .base import Target
from .masks import lowest_overall, selection_bytes
from .statistics import total_count

POLICIES = ("cmpq", "cmpq-noise", "pmpq", "tdmpq")
RIDGE = 1e-6  # of the largest variance: directions below it carry no signal to correlate (and no inverse)
# Rows of W multiplied with H at once: the products are float32 over row chunks of about this many weights (64 MiB),
# summed in float64, so no rows × columns product and no float64 copy of H exist (BLOOM-176B's dense_4h_to_h has a
# 57344² Hessian: 13 GiB in float32, 26 GiB in float64).
CHUNK_VALUES = 2**24


def _row_chunks(weight: torch.Tensor):
    step = max(1, CHUNK_VALUES // weight.shape[1])
    return (weight[start : start + step].float() for start in range(0, weight.shape[0], step))


def output_second_moments(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """The nonzero spectrum of W H Wᵀ (float64, min(rows, columns) eigenvalues, ascending), from the smaller side:
    only min(rows, columns)² matrices are float64."""
    rows, columns = weight.shape
    hessian = hessian.float()
    if rows <= columns:
        transposed = weight.float().T
        moments = torch.cat([chunk @ hessian @ transposed for chunk in _row_chunks(weight)])
        return torch.linalg.eigvalsh(moments.double())
    values, vectors = torch.linalg.eigh(hessian.double())
    root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T  # H^½: W H Wᵀ and H^½ WᵀW H^½ share eigenvalues
    del vectors
    gram = torch.zeros(columns, columns, dtype=torch.float64, device=weight.device)
    for chunk in _row_chunks(weight):
        gram += (chunk.T @ chunk).double()
    return torch.linalg.eigvalsh(root @ gram @ root)


class BlockCorrelation:
    """Centered cross-moments of a block's input and output hidden states, accumulated over token chunks in
    float64 (three width² matrices: 4.6 GiB at BLOOM-176B's 14336), for CMPQ's canonical correlations."""

    def __init__(self, width: int, device: torch.device):
        self.tokens = 0
        self.sums = torch.zeros(2, width, dtype=torch.float64, device=device)
        self.xx, self.yy, self.xy = (torch.zeros(width, width, dtype=torch.float64, device=device) for _ in range(3))

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).double()
        y = outputs.reshape(-1, outputs.shape[-1]).double()
        self.tokens += x.shape[0]
        self.sums[0] += x.sum(dim=0)
        self.sums[1] += y.sum(dim=0)
        self.xx.addmm_(x.T, x)
        self.yy.addmm_(y.T, y)
        self.xy.addmm_(x.T, y)

    def combine(self, total: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Every share's moments summed (`total` sums a tensor over the shares, as Statistic.combine's does)."""
        for moment in (self.sums, self.xx, self.yy, self.xy):
            total(moment)
        self.tokens = total_count(total, self.tokens, self.sums.device)

    def correlations(self) -> torch.Tensor:
        """The canonical correlations (descending): singular values of Cxx^-½ Cxy Cyy^-½, each side whitened over
        the directions whose variance exceeds RIDGE of its largest (the rest carry no signal)."""
        mean_x, mean_y = self.sums / self.tokens
        covariance = [moment / self.tokens - torch.outer(a, b) for moment, a, b in
                      ((self.xx, mean_x, mean_x), (self.yy, mean_y, mean_y), (self.xy, mean_x, mean_y))]
        whiten = []
        for matrix in covariance[:2]:
            values, vectors = torch.linalg.eigh(matrix)
            kept = values > RIDGE * values.max().clamp(min=1e-300)
            whiten.append(vectors[:, kept] / values[kept].sqrt())
        return torch.linalg.svdvals(whiten[0].T @ covariance[2] @ whiten[1]).clamp(max=1.0)

    def sensitivity(self) -> float:
        """CMPQ: 1 − the mean canonical correlation."""
        return float(1 - self.correlations().mean())

    @staticmethod
    def nbytes(width: int) -> int:
        """Its three float64 width² matrices and, while the correlations are taken, about three more."""
        return 6 * 8 * width * width


def canonical_sensitivity(
    weight: torch.Tensor, hessian: torch.Tensor, noise: float, energy: float | None = None,
) -> float:
    """cmpq-noise (ours): 1 − mean canonical correlation of X and XWᵀ + e, e isotropic at `noise` × the mean output
    variance. energy: output_energy(weight, hessian), when the caller has it (as for the next two)."""
    spectrum = output_second_moments(weight, hessian).clamp(min=0)
    level = noise * (output_energy(weight, hessian) if energy is None else energy) / weight.shape[0]
    if level <= 0:  # a layer that outputs nothing: no signal to lose
        return 0.0
    return float(1 - (spectrum / (spectrum + level)).sqrt().mean())


def output_energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(W H Wᵀ) = 2‖WX‖²/N, over row chunks of W. Each call is a rows × columns² product (1.25·10¹³ flops on
    OPT-66B's fc2), so the sensitivities take it from their caller when it has it."""
    hessian = hessian.float()
    return sum(float(((chunk @ hessian) * chunk).sum(dtype=torch.float64)) for chunk in _row_chunks(weight))


def pruning_sensitivity(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                        energy: float | None = None) -> float:
    """PMPQ: ‖(W − W_p)X‖² / ‖WX‖² with W_p magnitude-pruned at `sparsity` (no reconstruction)."""
    removed = weight * lowest_overall(weight.abs(), int(weight.numel() * sparsity))
    energy = output_energy(weight, hessian) if energy is None else energy
    return output_energy(removed, hessian) / max(energy, 1e-300)


def taylor_sensitivity(weight: torch.Tensor, hessian: torch.Tensor, energy: float | None = None) -> float:
    """TDMPQ: E‖Wδ‖² / ‖WX‖² for δ_j = σ_j·n_j, σ_j² = E[x_j²]: Σ_j H_jj ‖W_:,j‖² / tr(W H Wᵀ)."""
    column_energy = torch.linalg.vector_norm(weight.float(), dim=0).double().pow(2)
    diagonal = float((column_energy * hessian.diagonal().double()).sum())
    energy = output_energy(weight, hessian) if energy is None else energy
    return diagonal / max(energy, 1e-300)


def working_bytes(rows: int, columns: int, sparsity: float = 0.5) -> int:
    """Peak memory of the sensitivities above on a rows × columns layer besides W and H: float64 matrices of the
    smaller side (a few at once) and the float32 chunk products; PMPQ's magnitude selection at `sparsity` (the
    largest probe) and pruned copy."""
    side = min(rows, columns)
    spectral = (4 if rows > columns else 2) * 8 * side * side + 4 * side * side
    step = min(rows, max(1, CHUNK_VALUES // columns))  # rows of a chunk: its W, W H and W H Wᵀ rows
    chunk = 4 * step * (2 * columns + rows)
    # PMPQ: |W|, its selection over the whole matrix (a sorted copy with indices, top-k's values and indices, the
    # mask: methods/masks.py), the pruned copy
    selection = rows * columns * (4 + 4) + selection_bytes(rows, columns, Target(sparsity=sparsity), per_row=False)
    return max(spectral, selection) + chunk
