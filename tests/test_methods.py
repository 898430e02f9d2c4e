"""The maths of the pruning methods on single linear layers: no files, no schedule."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from methods import METHODS, Target
from methods.hessian import (
    NonInvertibleHessian, invert_lower_triangular, inverse_cholesky, scaled_copy, turn_half,
)
from methods.masks import (
    lowest_by_threshold, lowest_from_kth, lowest_in_rows, lowest_overall, masked_sum, n_of_m,
)
from methods.statistics import ColumnNorms, Gram


def correlated_inputs(columns: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features and a few large-magnitude ones, like real LLM activations."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    scales = torch.ones(columns)
    scales[:4] = 8.0
    return (torch.randn(tokens, columns, generator=generator) @ mixing + 0.3) * scales


def layer_with_statistics(method_name: str, inputs: torch.Tensor, rows: int = 48):
    torch.manual_seed(1)
    layer = nn.Linear(inputs.shape[1], rows, bias=False)
    method = METHODS[method_name]()
    statistic = method.statistic(layer)
    if statistic is not None:
        for chunk in inputs.split(100):
            statistic.update(chunk)
    return layer, method, statistic


def reconstruction_error(method_name: str, target: Target, inputs: torch.Tensor) -> float:
    layer, method, statistic = layer_with_statistics(method_name, inputs)
    result = method.compress(layer, statistic, target)
    return (inputs @ (layer.weight.detach() - result.weight).T).pow(2).sum().item()


@pytest.mark.parametrize("target", [Target(sparsity=0.5), Target(sparsity=0.7), Target(pattern=(2, 4))])
def test_sparsegpt_beats_wanda_beats_magnitude_on_reconstruction_error(target):
    inputs = correlated_inputs(64, 2000)
    errors = {name: reconstruction_error(name, target, inputs) for name in ("sparsegpt", "wanda", "magnitude")}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_every_method_hits_its_target_exactly(name):
    inputs = correlated_inputs(64, 500)
    layer, method, statistic = layer_with_statistics(name, inputs)
    result = method.compress(layer, statistic, Target(sparsity=0.5))
    assert result.mask.sum().item() == 48 * 64 // 2  # exactly: the reference SparseGPT (`<= sorted[k]`) prunes one more
    assert torch.equal(result.weight == 0, result.mask) and result.weight.dtype == layer.weight.dtype
    patterned = method.compress(layer, statistic, Target(pattern=(2, 4)))
    assert ((patterned.weight.reshape(48, -1, 4) == 0).sum(-1) == 2).all()
    assert torch.equal(layer.weight, layer_with_statistics(name, inputs)[0].weight), "compress must not modify"


def test_masks_prune_the_lowest_scores():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.1, 0.9, 0.7]])
    assert lowest_in_rows(scores, 1).tolist() == [[False, True, False, False], [False, True, False, False]]
    assert lowest_overall(scores, 3).tolist() == [[False, False, False, False], [True, True, False, True]]
    assert n_of_m(scores, 2, 4).tolist() == [[False, True, False, True], [True, True, False, False]]


@pytest.mark.parametrize("count", [0, 1, 999, 2000, 3700])
def test_threshold_selection_is_the_top_k_of_a_large_matrix(count):
    """Without ties the chunked radix select marks exactly top-k's set, chunks cut anywhere, negatives included."""
    scores = torch.randn(37, 100, generator=torch.Generator().manual_seed(count)) * 3
    expected = torch.zeros(scores.numel(), dtype=torch.bool)
    expected[torch.topk(scores.flatten(), count, largest=False).indices] = True
    for chunk in (7, 128, scores.numel()):
        assert torch.equal(lowest_by_threshold(scores, count, chunk), expected.view_as(scores))


def test_threshold_selection_breaks_ties_by_position():
    scores = torch.tensor([[2.0, 1.0, 2.0, 0.0], [2.0, 3.0, 1.0, 2.0]])
    assert lowest_by_threshold(scores, 5, chunk=3).tolist() == [[True, True, True, True], [False, False, True, False]]


@pytest.mark.parametrize("count", [1, 999, 2000, 3699, 3700])
def test_kth_value_selection_is_the_top_k_and_breaks_ties_as_the_threshold_selection(count):
    """The CPU path of lowest_overall: top-k's set without ties; with ties (scores rounded to a few values, and
    SparseGPT's zeros) the first in flat order, exactly as the chunked radix select chooses them."""
    scores = torch.randn(37, 100, generator=torch.Generator().manual_seed(count)) * 3
    expected = torch.zeros(scores.numel(), dtype=torch.bool)
    expected[torch.topk(scores.flatten(), count, largest=False).indices] = True
    assert torch.equal(lowest_from_kth(scores, count), expected.view_as(scores))
    tied = scores.round().abs()  # no -0.0: the radix select's keys order it below +0.0, comparisons do not
    mask = lowest_from_kth(tied, count)
    assert int(mask.sum()) == count
    assert torch.equal(mask, lowest_by_threshold(tied, count, chunk=128))


def test_a_whole_matrix_above_the_top_k_limit_is_selected_by_threshold(monkeypatch):
    import methods.masks as masks

    scores = torch.rand(64, 64, generator=torch.Generator().manual_seed(0))
    expected = lowest_overall(scores, 2048)
    monkeypatch.setattr(masks, "TOPK_VALUES", 1000)
    monkeypatch.setattr(masks, "lowest_by_threshold", lambda s, c: expected.logical_not())  # shows which path ran
    assert torch.equal(masks.lowest_overall(scores, 2048), expected.logical_not())


def test_masked_sum_is_the_sum_of_the_selected_values_however_the_chunks_cut():
    """The score pass's saliency total: plainly Σ values[mask] in float64 (chunks cut rows anywhere, the last short)."""
    values = torch.randn(37, 100, generator=torch.Generator().manual_seed(1))
    mask = values.abs() < 0.8
    expected = sum(float(v) for v, keep in zip(values.flatten().double(), mask.flatten()) if keep)
    for chunk in (7, 128, values.numel(), 10 * values.numel()):
        assert masked_sum(values, mask, chunk) == pytest.approx(expected, rel=1e-12)
    assert masked_sum(values, torch.zeros_like(mask)) == 0.0


def test_statistics_accumulate_over_micro_batches():
    inputs = torch.randn(3, 10, 8)
    layer = nn.Linear(8, 4)
    gram, norms = Gram(layer), ColumnNorms(layer)
    for batch in inputs:
        gram.update(batch)
        norms.update(batch)
    flat = inputs.reshape(-1, 8)
    torch.testing.assert_close(gram.hessian, 2 * flat.T @ flat / 30)
    torch.testing.assert_close(norms.norms, flat.norm(dim=0))


def test_singular_hessian_gets_more_damping_and_a_log_line(caplog):
    vector = torch.ones(6, 1)
    singular = vector @ vector.T  # rank one
    with caplog.at_level(logging.WARNING, logger="layerpress"):
        factor, damping = inverse_cholesky(singular, 0.0)
    assert damping > 0 and torch.isfinite(factor).all()
    assert "not positive definite" in caplog.text


def test_act_order_factor_is_that_of_the_permuted_hessian_without_a_permuted_copy():
    inputs = correlated_inputs(24, 200)
    inputs[:, 3] = 0.0  # a dead input: its diagonal entry must be set to 1 where the permutation puts it
    hessian = inputs.T @ inputs
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    expected, _ = inverse_cholesky(hessian[order][:, order], 0.01, 0.5)
    scaled = torch.empty_strided((24, 24), (1, 24))
    scaled_copy(hessian, 0.5, order, scaled, chunk=24 * 5)  # five columns a chunk: the last one is short
    torch.testing.assert_close(scaled, 0.5 * hessian[order][:, order], rtol=0, atol=0)
    factor, _ = inverse_cholesky(hessian, 0.01, 0.5, order)
    torch.testing.assert_close(factor, expected, rtol=0, atol=0)


@pytest.mark.parametrize("size", [5, 64, 203])
def test_triangular_inverse_by_halves_and_half_turn_are_exact_rewrites(size):
    generator = torch.Generator().manual_seed(size)
    spread = torch.randn(size, size, generator=generator, dtype=torch.float64)
    lower = torch.linalg.cholesky(spread @ spread.T / size + torch.eye(size, dtype=torch.float64))  # as it meets them
    inverse = lower.clone()
    invert_lower_triangular(inverse, leaf=8, chunk=3 * size)  # several levels, several chunks per product
    torch.testing.assert_close(inverse, torch.linalg.inv(lower), rtol=1e-9, atol=1e-9)
    assert (inverse.triu(1) == 0).all()
    turned = lower.clone()
    turn_half(turned, chunk=2 * size)
    assert torch.equal(turned, lower.flip(0, 1))


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    inputs = correlated_inputs(40, 300)
    hessian = inputs.T @ inputs / 300
    factor, damping = inverse_cholesky(hessian, 0.01, 2.0)
    damped = 2.0 * hessian.double()
    damped.diagonal().add_(damping * damped.diagonal().mean())
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)  # plainly: invert, then factor
    torch.testing.assert_close(factor.double(), expected, rtol=1e-4, atol=1e-5)
    assert factor.stride() == (1, 40)  # column-major, as the solvers left it


def test_non_finite_hessian_is_a_clear_error():
    inputs = correlated_inputs(16, 100)
    inputs[0, 0] = float("inf")
    layer, method, statistic = layer_with_statistics("sparsegpt", inputs)
    with pytest.raises(NonInvertibleHessian, match="non-finite"):
        method.compress(layer, statistic, Target(sparsity=0.5))


def test_dead_inputs_are_pruned_without_nan():
    inputs = correlated_inputs(32, 300)
    inputs[:, 5] = 0.0
    layer, method, statistic = layer_with_statistics("sparsegpt", inputs)
    result = method.compress(layer, statistic, Target(sparsity=0.5))
    assert torch.isfinite(result.weight).all() and (result.weight[:, 5] == 0).all()
