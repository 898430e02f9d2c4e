"""Per-layer sparsity allocation: pure maths from per-layer numbers to per-layer sparsities, no files.

Every allocation first proposes a raw sparsity per layer (its shape: which layers get more, which less), then
`fit_to_target` shifts all proposals by one common offset, clipped to [lower, upper], so that the parameter-weighted
mean sparsity is exactly the global target. The shift keeps the order of the proposals; clipping only flattens the
layers that would leave the bounds.

- uniform: every layer gets the target.
- score (Zhang et al., 2024, "Aggressive Post-Training Compression on Extremely Large Language Models"): layers are
  clustered by log10 of their estimated pruning loss into levels (optimal 1-D k-means); the levels, from lowest to
  highest loss, are spread evenly from `upper` down to `lower`.
- owl (Yin et al., 2024, outlier-weighed layer sparsity): blocks with a larger share of outlier Wanda scores get
  less sparsity; the outlier ratios are mapped linearly onto a spread of 2λ around the target.
- depth: sparsity rising linearly with the block index from `lower` to `upper` (the layer-order baseline).

`bits_by_sensitivity` allocates bit widths instead (CPTQuant's mixed precision): first fit in descending
sensitivity under an average-bits budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def check_bounds(target: float, lower: float, upper: float) -> None:
    """The target must be reachable: 0 <= lower <= target <= upper < 1."""
    if not 0.0 <= lower <= target <= upper < 1.0:
        raise ValueError(
            f"per-layer sparsity bounds [{lower:g}, {upper:g}] must satisfy 0 <= min <= target ({target:g}) <= max < 1"
        )


def fit_to_target(
    proposals: Sequence[float], params: Sequence[int], target: float, lower: float, upper: float
) -> list[float]:
    """clip(proposal + shift, lower, upper) per layer, with the one shift that makes the parameter-weighted mean
    exactly `target`.

    The weighted mean of the clipped values is piecewise linear and non-decreasing in the shift, so the shift is
    found exactly: locate the linear piece between two breakpoints (where a layer reaches a bound) and solve it.
    """
    check_bounds(target, lower, upper)
    if not proposals or len(proposals) != len(params) or min(params) <= 0:
        raise ValueError("need one proposal and a positive parameter count per layer")
    if target in (lower, upper):  # only all-at-the-bound reaches a bound
        return [float(target)] * len(proposals)

    def clipped(shift: float) -> list[float]:
        return [min(max(p + shift, lower), upper) for p in proposals]

    # Breakpoints: shifts where a layer reaches a bound. At the first every layer is at `lower`, at the last every
    # layer is at `upper`, so the piece whose ends bracket the target exists; the mean is linear inside it.
    breakpoints = sorted({lower - p for p in proposals} | {upper - p for p in proposals})
    means = [weighted_mean(clipped(b), params) for b in breakpoints]
    piece = next(i for i in range(1, len(means)) if means[i] >= target)
    low, high = means[piece - 1], means[piece]
    left, right = breakpoints[piece - 1], breakpoints[piece]
    return clipped(left + (target - low) * (right - left) / (high - low))


def uniform(params: Sequence[int], target: float) -> list[float]:
    return [float(target)] * len(params)


def by_depth(
    blocks: Sequence[int], params: Sequence[int], target: float, lower: float, upper: float
) -> list[float]:
    """Sparsity rising linearly with the block index, from `lower` at the first block to `upper` at the last."""
    first, last = min(blocks), max(blocks)
    span = max(last - first, 1)
    proposals = [lower + (upper - lower) * (block - first) / span for block in blocks]
    return fit_to_target(proposals, params, target, lower, upper)


def kmeans_1d(values: Sequence[float], clusters: int) -> list[int]:
    """Optimal 1-D k-means (dynamic programming over the sorted values): the cluster of each value, 0 = lowest.

    Deterministic and exact, unlike Lloyd's iterations; O(clusters · n²), trivial for a model's few hundred layers.
    Fewer clusters are returned when there are fewer distinct values.
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    ordered = [values[i] for i in order]
    n = len(ordered)
    clusters = max(1, min(clusters, len(set(ordered))))
    prefix, prefix_sq = [0.0], [0.0]
    for v in ordered:
        prefix.append(prefix[-1] + v)
        prefix_sq.append(prefix_sq[-1] + v * v)

    def cost(start: int, end: int) -> float:  # squared deviation of ordered[start:end] from its mean
        total = prefix[end] - prefix[start]
        return prefix_sq[end] - prefix_sq[start] - total * total / (end - start)

    best = [[math.inf] * (n + 1) for _ in range(clusters + 1)]
    split = [[0] * (n + 1) for _ in range(clusters + 1)]
    best[0][0] = 0.0
    for k in range(1, clusters + 1):
        for end in range(k, n + 1):
            for start in range(k - 1, end):
                candidate = best[k - 1][start] + cost(start, end)
                if candidate < best[k][end]:
                    best[k][end], split[k][end] = candidate, start
    labels = [0] * n
    end = n
    for k in range(clusters, 0, -1):
        start = split[k][end]
        for position in range(start, end):
            labels[order[position]] = k - 1
        end = start
    return labels


def by_score_levels(
    losses: Sequence[float], params: Sequence[int], target: float, lower: float, upper: float, levels: int = 3,
    kinds: Sequence[str] | None = None,
) -> list[float]:
    """Cluster layers by log10 of their estimated pruning loss; lower-loss levels get higher sparsity.

    Level i of k (0 = lowest loss) proposes upper − i·(upper − lower)/(k − 1); then the proposals are fitted to
    the target. A loss of zero (a layer the probe could not hurt) joins the lowest level.
    kinds: each layer's type (q_proj, fc2, ...): the layers of each type are clustered among themselves, so the
    levels rank depth within a type; clustered jointly, the levels mostly sort the types by width and role
    (SmolLM2: every down_proj above every k_proj).
    """
    positive = [loss for loss in losses if loss > 0]
    floor = math.log10(min(positive)) if positive else 0.0
    logs = [math.log10(loss) if loss > 0 else floor for loss in losses]
    proposals = [0.0] * len(logs)
    for members in _by_kind(kinds, len(logs)):
        labels = kmeans_1d([logs[i] for i in members], levels)
        count = max(labels) + 1
        for i, label in zip(members, labels):
            proposals[i] = target if count == 1 else upper - label * (upper - lower) / (count - 1)
    if len(set(proposals)) == 1:
        return uniform(params, target)
    return fit_to_target(proposals, params, target, lower, upper)


def _by_kind(kinds: Sequence[str] | None, count: int) -> list[list[int]]:
    """The layer indices of each kind, in first-seen order (all layers together without kinds)."""
    if kinds is None:
        return [list(range(count))]
    groups: dict[str, list[int]] = {}
    for index, kind in enumerate(kinds):
        groups.setdefault(kind, []).append(index)
    return list(groups.values())


def owl(
    outlier_ratios: Sequence[float], params: Sequence[int], target: float, lower: float, upper: float,
    spread: float = 0.08,
) -> list[float]:
    """Outlier-weighed sparsity: ratios mapped linearly onto [target − spread, target + spread], more outliers
    getting less sparsity; then fitted to the target within the bounds."""
    low, high = min(outlier_ratios), max(outlier_ratios)
    if high == low:
        return uniform(params, target)
    proposals = [target + spread - 2 * spread * (ratio - low) / (high - low) for ratio in outlier_ratios]
    return fit_to_target(proposals, params, target, lower, upper)


def check_bit_budget(choices: Sequence[int], average: float) -> None:
    """The average must be reachable with these choices: min(choices) <= average <= max(choices)."""
    if not choices or len(set(choices)) != len(choices):
        raise ValueError(f"bit choices must be distinct, got {list(choices)}")
    if not min(choices) <= average <= max(choices):
        raise ValueError(f"--avg-bits {average:g} lies outside the bit choices [{min(choices)}, {max(choices)}]")


def bits_by_sensitivity(
    sensitivities: Sequence[float], params: Sequence[int], choices: Sequence[int], average: float
) -> list[int]:
    """Per-layer bits from `choices`, parameter-weighted mean at most `average`, the most sensitive layers highest.

    Every layer starts at the lowest choice; then, in descending sensitivity (ties: forward order), each layer takes
    the highest choice the remaining budget affords (first fit: a layer too large for what is left is passed over, so
    a smaller, less sensitive one can still use it). The mean then lies within one layer's step of `average`.
    """
    check_bit_budget(choices, average)
    if not sensitivities or len(sensitivities) != len(params) or min(params) <= 0:
        raise ValueError("need one sensitivity and a positive parameter count per layer")
    ordered = sorted(choices)
    bits = [ordered[0]] * len(params)
    left = average * sum(params) - ordered[0] * sum(params)  # bit·parameters still to give
    for layer in sorted(range(len(params)), key=lambda i: -sensitivities[i]):
        affordable = [b for b in ordered if (b - ordered[0]) * params[layer] <= left + 1e-9 * params[layer]]
        bits[layer] = affordable[-1]
        left -= (bits[layer] - ordered[0]) * params[layer]
    return bits
