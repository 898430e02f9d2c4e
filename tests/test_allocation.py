"""Per-layer sparsity allocations (methods/allocation.py): the global target is met exactly, bounds hold."""

from __future__ import annotations

import math
import random

import pytest

from methods import allocation

LOWER, UPPER = 0.6, 0.8


def model_like_layers(blocks: int = 12, seed: int = 0) -> dict[str, list]:
    """Layers of a Llama-like model: 7 per block with unequal sizes, losses spread over decades."""
    rng = random.Random(seed)
    sizes = [4, 1, 1, 4, 10, 10, 10]
    layers: dict[str, list] = {"blocks": [], "params": [], "losses": [], "ratios": []}
    for block in range(blocks):
        ratio = rng.uniform(0.001, 0.02)
        for size in sizes:
            layers["blocks"].append(block)
            layers["params"].append(size * 1000)
            layers["losses"].append(10 ** rng.uniform(-3, 2))
            layers["ratios"].append(ratio)
    return layers


def allocate(kind: str, layers: dict[str, list], target: float, lower: float, upper: float) -> list[float]:
    if kind == "uniform":
        return allocation.uniform(layers["params"], target)
    if kind == "depth":
        return allocation.by_depth(layers["blocks"], layers["params"], target, lower, upper)
    if kind == "score":
        return allocation.by_score_levels(layers["losses"], layers["params"], target, lower, upper)
    return allocation.owl(layers["ratios"], layers["params"], target, lower, upper)


KINDS = ("uniform", "score", "owl", "depth")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target, lower, upper", [(0.7, 0.6, 0.8), (0.5, 0.3, 0.9), (0.62, 0.6, 0.8), (0.79, 0.6, 0.8)])
def test_allocations_hit_the_target_exactly_within_the_bounds(kind, target, lower, upper):
    layers = model_like_layers()
    chosen = allocate(kind, layers, target, lower, upper)
    assert len(chosen) == len(layers["params"])
    assert allocation.weighted_mean(chosen, layers["params"]) == pytest.approx(target, abs=1e-12)
    assert min(chosen) >= lower - 1e-12 and max(chosen) <= upper + 1e-12
    if kind != "uniform":  # room to spread is what the bounds leave on the tighter side of the target
        room = min(target - lower, upper - target)
        assert max(chosen) - min(chosen) > room / 2, "a non-uniform allocation should spread the sparsities"


def test_lower_loss_levels_get_higher_sparsity():
    layers = model_like_layers()
    chosen = allocation.by_score_levels(layers["losses"], layers["params"], 0.7, LOWER, UPPER, levels=3)
    pairs = sorted(zip(layers["losses"], chosen))
    assert all(s1 >= s2 for (_, s1), (_, s2) in zip(pairs, pairs[1:])), "sparsity must not rise with the loss"
    assert len(set(chosen)) == 3, "three levels, three sparsities"


def test_levels_are_clusters_of_log_loss():
    losses = [1e-4, 2e-4, 1.5e-4, 1.0, 3.0, 2.0, 1e3, 2e3]
    assert allocation.kmeans_1d([math.log10(v) for v in losses], 3) == [0, 0, 0, 1, 1, 1, 2, 2]
    chosen = allocation.by_score_levels(losses, [1] * 8, 0.7, LOWER, UPPER, levels=3)
    assert chosen[0] == chosen[1] == chosen[2] > chosen[3] == chosen[4] == chosen[5] > chosen[6] == chosen[7]


def test_per_type_levels_rank_depth_within_each_layer_type():
    """Jointly, a wide type's every layer outranks a narrow type's; per type, each type gets all its levels."""
    losses = [1e-3, 2e-3, 4e-3, 1.0, 2.0, 4.0]  # k_proj at three depths, then down_proj at the same depths
    kinds = ["k_proj"] * 3 + ["down_proj"] * 3
    joint = allocation.by_score_levels(losses, [1] * 6, 0.7, LOWER, UPPER, levels=2)
    assert joint[0] == joint[1] == joint[2] > joint[3] == joint[4] == joint[5], "joint: the levels split the types"
    per_type = allocation.by_score_levels(losses, [1] * 6, 0.7, LOWER, UPPER, levels=2, kinds=kinds)
    assert per_type[0] == per_type[3] and per_type[2] == per_type[5] and per_type[0] > per_type[2]
    assert sum(per_type) / 6 == pytest.approx(0.7)


def test_owl_gives_blocks_with_more_outliers_less_sparsity():
    ratios = [0.01, 0.05, 0.02, 0.03]
    chosen = allocation.owl(ratios, [1, 1, 1, 1], 0.7, LOWER, UPPER, spread=0.08)
    assert sorted(range(4), key=lambda i: chosen[i]) == [1, 3, 2, 0]
    assert max(chosen) - min(chosen) == pytest.approx(0.16), "spread over the target plus or minus lambda"


def test_depth_rises_linearly_with_the_block_index():
    chosen = allocation.by_depth([0, 1, 2, 3, 4], [1] * 5, 0.7, LOWER, UPPER)
    assert chosen == pytest.approx([0.6, 0.65, 0.7, 0.75, 0.8])


def test_fit_clips_at_the_bounds_and_still_meets_the_target():
    chosen = allocation.fit_to_target([0.0, 0.0, 1.0], [1, 1, 2], 0.7, LOWER, UPPER)
    assert chosen[2] == UPPER and chosen[0] == chosen[1] == pytest.approx(0.6)
    assert allocation.weighted_mean(chosen, [1, 1, 2]) == pytest.approx(0.7)


@pytest.mark.parametrize("kind", KINDS)
def test_degenerate_inputs_behave(kind):
    # all scores equal: nothing ranks one layer above another, so every layer gets the target (depth still rises)
    flat = {"blocks": [0, 0, 1, 1], "params": [1, 2, 1, 2], "losses": [3.0] * 4, "ratios": [0.01] * 4}
    chosen = allocate(kind, flat, 0.7, LOWER, UPPER)
    if kind != "depth":
        assert chosen == [0.7] * 4
    # one layer: it carries the whole target
    single = {"blocks": [0], "params": [5], "losses": [2.0], "ratios": [0.1]}
    assert allocate(kind, single, 0.7, LOWER, UPPER) == [0.7]
    # target 0 with a lower bound of 0: nothing is pruned
    assert allocate(kind, model_like_layers(2), 0.0, 0.0, 0.1) == [0.0] * 14
    # target at the upper bound: every layer at the bound
    assert allocate(kind, model_like_layers(2), 0.8, LOWER, 0.8) == [0.8] * 14


def test_zero_losses_join_the_lowest_level():
    chosen = allocation.by_score_levels([0.0, 1e-3, 10.0, 20.0], [1] * 4, 0.7, LOWER, UPPER, levels=2)
    assert chosen[0] == chosen[1] > chosen[2] == chosen[3]


@pytest.mark.parametrize("target, lower, upper", [(0.7, 0.75, 0.8), (0.7, 0.6, 0.65), (0.7, -0.1, 0.8), (0.9, 0.8, 1.0)])
def test_unreachable_targets_are_refused(target, lower, upper):
    with pytest.raises(ValueError, match="bounds"):
        allocation.fit_to_target([0.5, 0.6], [1, 1], target, lower, upper)
