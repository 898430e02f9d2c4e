"""How much pruning would hurt a layer: the per-layer numbers the sparsity allocations rank layers by.

Both loss estimates are in the units of the layer-wise reconstruction error ‖WX − ŴX‖² / N (N calibration tokens;
with H = 2XᵀX/N this is ½·ΔW H ΔWᵀ summed over rows), and both use the upper Cholesky factor U of the damped H⁻¹
that SparseGPT sweeps with:

- `obs_loss`: the loss SparseGPT's sweep accumulates while it prunes the layer at the probe sparsity,
  Σ (w − ŵ)² / [U]_jj² / 2 with the weights as the sweep has updated them. Because the sweep eliminates columns in
  order with the Cholesky factor's conditional variances, this is the exact reconstruction error of the weights it
  returns under the damped Hessian: what compressing this layer at this sparsity actually costs.
- `saliency`: the one-shot OBS saliency of the whole matrix, ½ Σ_pruned w² / [U]_qq² over the probe fraction of
  weights with the lowest w² / [U]_qq² (the seed paper's L_ℓ). It ignores how removing one weight changes the others,
  so it misjudges heavy pruning (in our measurements it stays below the sweep's loss); it needs no sweep.

Both grow with the scale of the layer's output, which in a pre-norm transformer grows with depth. `output_energy`,
‖WX‖² / N = ½ tr(W H Wᵀ), lets an allocation rank by the relative loss obs_loss / output_energy instead: the
fraction of the layer's output that pruning destroys.

The outlier counts are OWL's (Yin et al., 2024): Wanda scores |W_ij|·‖X_j‖ above M times the mean score of the
whole block. `cmpq-noise`, `pmpq` (per probe) and `tdmpq` are CPTQuant's sensitivities (methods/sensitivity.py),
which `compress --bits-policy` turns into per-layer bit widths; `cmpq`, the paper's reading that compares a block's
input and output, is added per block by the score pass (`Scorer.block_correlation`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from .base import LayerCost, Target
from .hessian import dead_inputs, inverse_cholesky
from .masks import lowest_overall, masked_sum, selection_bytes
from .obs import sweep
from .sparsegpt import SparseGPT
from .sensitivity import (
    BlockCorrelation, canonical_sensitivity, output_energy, pruning_sensitivity, taylor_sensitivity,
)
from .sensitivity import working_bytes as sensitivity_working_bytes
from .statistics import Gram, check_gram_dtype


@dataclass
class LayerScore:
    """What the score pass records for one linear layer, with both loss estimates per probe sparsity.

    pruned: the sweep's weight at the probe, when asked for (to propagate pruned inputs), else None.
    """

    params: int
    obs_loss: dict[float, float]
    saliency: dict[float, float]
    damping: float
    output_energy: float
    cmpq_noise: float
    pmpq: dict[float, float]
    tdmpq: float
    outliers: int = 0
    pruned: torch.Tensor | None = None

    def record(self) -> dict[str, Any]:
        return {
            "params": self.params, "outliers": self.outliers, "damping": self.damping,
            "output_energy": self.output_energy,
            "obs_loss": {probe_key(p): v for p, v in self.obs_loss.items()},
            "saliency": {probe_key(p): v for p, v in self.saliency.items()},
            "cmpq-noise": self.cmpq_noise, "pmpq": {probe_key(p): v for p, v in self.pmpq.items()}, "tdmpq": self.tdmpq,
        }


def probe_key(sparsity: float) -> str:
    """How a probe sparsity is written as a JSON key: its shortest repr, e.g. "0.7"."""
    return repr(float(sparsity))


def saliencies(weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """w² / [U]_qq² of every weight, made in one float32 matrix (no w² temporary beside it: 1.3 GiB for OPT-66B
    fc2)."""
    saliency = weight.square()
    return saliency.div_(factor.diagonal().square().unsqueeze(0))


def one_shot_saliency(weight: torch.Tensor, factor: torch.Tensor, mask: torch.Tensor) -> float:
    """½ Σ over the masked weights of w² / [U]_qq²: the OBS loss estimate of removing them, each on its own."""
    return masked_sum(saliencies(weight, factor), mask) / 2


def score_layer(
    layer: nn.Linear, gram: Gram, sparsities: tuple[float, ...], damping: float, blocksize: int,
    keep_pruned: bool = False, cca_noise: float = 0.01,
) -> LayerScore:
    """Both loss estimates of pruning `layer` to each probe sparsity (unstructured), from one Cholesky factor, and
    CPTQuant's per-layer sensitivities (cca_noise: cmpq-noise's output noise level).

    keep_pruned: also return the sweep's weight at the (single) probe.
    """
    weight = layer.weight.detach().to(torch.float32, copy=True)
    weight.masked_fill_(dead_inputs(gram.gram), 0.0)
    # The steps run in the order that keeps their largest temporaries apart (`Scorer.layer_cost`): the
    # sensitivities before the factor exists, the saliencies freed before the sweeps, and the last sweep on the
    # weight itself. Together they held 12.02 GiB beside OPT-66B fc2's 5.06 GiB Gram; apart, 8.0 GiB.
    # The sensitivities are ratios, the same for XᵀX as for H = scale · XᵀX: they read the Gram itself, so no n × n
    # copy of H is made (13 GB for BLOOM-176B's dense_4h_to_h); only the output energy is scaled back. They share
    # one tr(W XᵀX Wᵀ): three W·H products of the six a one-probe layer made (a 1152 × 4608 layer, 2 threads:
    # 2.86 → 2.29 s, the same numbers).
    hessian = gram.gram
    energy = output_energy(weight, hessian)
    cmpq_noise = canonical_sensitivity(weight, hessian, cca_noise, energy)
    pmpq = {p: pruning_sensitivity(weight, hessian, p, energy) for p in sparsities}
    tdmpq = taylor_sensitivity(weight, hessian, energy)
    factor, used_damping = inverse_cholesky(hessian, damping, gram.scale)
    result = LayerScore(layer.weight.numel(), {}, {}, used_damping, energy * gram.scale / 2,
                        cmpq_noise=cmpq_noise, pmpq=pmpq, tdmpq=tdmpq)
    saliency = saliencies(weight, factor)
    for sparsity in sparsities:
        mask = lowest_overall(saliency, int(weight.numel() * sparsity))
        result.saliency[sparsity] = masked_sum(saliency, mask) / 2  # one_shot_saliency's
        del mask
    del saliency
    for index, sparsity in enumerate(sparsities):
        last = index == len(sparsities) - 1
        pruned, _, result.obs_loss[sparsity] = sweep(weight if last else weight.clone(), factor,
                                                     Target(sparsity=sparsity), blocksize)
        if keep_pruned:
            result.pruned = pruned.to(layer.weight.dtype)
    return result


def wanda_scores(layer: nn.Linear, hessian_diagonal: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j‖ times sqrt(2/N) (from H_jj = 2‖X_j‖²/N): the same factor for every layer of a block, which
    outlier ratios do not see."""
    return layer.weight.detach().float().abs() * hessian_diagonal.sqrt().unsqueeze(0)


def outlier_counts(score_of: Callable[[str], torch.Tensor], names: Iterable[str], threshold: float) -> dict[str, int]:
    """Per layer, how many of its scores exceed `threshold` times the mean score of all the layers together.

    score_of(name) makes one layer's scores: they are made twice (for the mean, then for the counts) rather than
    all kept at once, which for a BLOOM-176B block would be 10 GB of float32 copies."""
    names = list(names)
    total, count = 0.0, 0
    for name in names:
        scores = score_of(name)
        total, count = total + float(scores.sum(dtype=torch.float64)), count + scores.numel()
    mean = total / count
    return {name: int((score_of(name) > threshold * mean).sum()) for name in names}


@dataclass
class Scorer:
    """The per-block maths of the score pass. sparsities: the probes; damping, blocksize, gram_dtype: SparseGPT's;
    outlier_threshold: OWL's M; cca_noise: cmpq-noise's output noise, relative to the mean output variance;
    keep_pruned: each layer's score also returns its weight pruned at the (single) probe, to propagate pruned
    inputs.

    It also answers the memory planner's questions as a `Method` does (`statistic`, `layer_cost`): the score
    pass is planned like a compress run that writes nothing."""

    sparsities: tuple[float, ...]
    damping: float = 0.01
    blocksize: int = 128
    outlier_threshold: float = 5.0
    cca_noise: float = 0.01
    gram_dtype: str = "auto"
    keep_pruned: bool = False

    name: ClassVar[str] = "scores"
    precomputed: ClassVar[tuple[str, ...]] = ()
    statistic_per_input: ClassVar[bool] = True  # a Gram; score_layer factorizes and sweeps copies of it

    def __post_init__(self) -> None:
        if not self.sparsities or not all(0.0 <= s < 1.0 for s in self.sparsities):
            raise ValueError(f"probe sparsities must lie in [0, 1), got {list(self.sparsities)}")
        if self.blocksize < 1 or self.damping < 0 or self.outlier_threshold <= 0 or self.cca_noise <= 0:
            raise ValueError("scores need blocksize >= 1, damping >= 0, an outlier threshold > 0 and a CCA noise > 0")
        if self.keep_pruned and len(self.sparsities) != 1:
            raise ValueError("pruning while scoring needs exactly one probe sparsity")
        check_gram_dtype(self.gram_dtype)

    def statistic(self, layer: nn.Linear) -> Gram:
        return Gram(layer, self.gram_dtype)

    def score(self, layer: nn.Linear, gram: Gram) -> LayerScore:
        """One layer's loss estimates and sensitivities (its outlier count needs the whole block: `outliers`)."""
        return score_layer(layer, gram, self.sparsities, self.damping, self.blocksize, self.keep_pruned,
                           self.cca_noise)

    @staticmethod
    def block_correlation(width: int, device: torch.device) -> BlockCorrelation:
        """CMPQ's statistic of one block: its input and output hidden states, fed after it is propagated."""
        return BlockCorrelation(width, device)

    def block_statistic_bytes(self, width: int, tokens: int) -> int:
        """What `block_correlation` holds while it is fed `tokens` (one micro-batch) at a time: its moments and the
        micro-batch's inputs and outputs in float64 (`BaseMethod.block_statistic_bytes`)."""
        return BlockCorrelation.nbytes(width) + 2 * 8 * tokens * width

    def outliers(self, layers: dict[str, nn.Linear], hessian_diagonals: dict[str, torch.Tensor]) -> dict[str, int]:
        """OWL's outlier count of every layer of one block, against the whole block's mean Wanda score."""
        return outlier_counts(lambda name: wanda_scores(layers[name], hessian_diagonals[name]), layers,
                              self.outlier_threshold)

    def layer_cost(self, rows: int, columns: int, dtype: torch.dtype, target: Target) -> LayerCost:
        """`score` on a rows × columns layer, the largest of its steps (score_layer runs them apart): the float32
        weight and the sensitivities' working memory; the factor, the weight, its saliencies and a selection over
        the whole matrix; the factor and one sweep (whose float32 weight is the layer's copy; with several probes a
        clone is swept and the copy kept). With keep_pruned, the pruned weight is kept."""
        weight = rows * columns
        probe = Target(sparsity=max(self.sparsities))
        sweep = SparseGPT(self.blocksize, self.damping, self.gram_dtype).layer_cost(rows, columns, dtype, probe)
        factor = 4 * columns * columns
        working = max(
            4 * weight + sensitivity_working_bytes(rows, columns, probe.sparsity),
            factor + 8 * weight + selection_bytes(rows, columns, probe, per_row=False),
            sweep.working_bytes + (4 * weight if len(self.sparsities) > 1 else 0),
        )
        # the sensitivities: W·H products (the output energy, the output moments, and per probe the pruned
        # weight's energy) and a float64 eigendecomposition of the smaller side (about 9 m³ flops: timed as a
        # factorization)
        side = min(rows, columns)
        sensitivities = 2.0 * weight * columns * (2 + len(self.sparsities)) + 2.0 * side * side * max(rows, columns)
        return replace(sweep, working_bytes=working,
                       kept_bytes=weight * dtype.itemsize if self.keep_pruned else 0,
                       sequential_ops=sweep.sequential_ops * len(self.sparsities),
                       matmul_flops=sweep.matmul_flops * len(self.sparsities) + sensitivities,
                       factor_flops=sweep.factor_flops + 9.0 * side**3)
