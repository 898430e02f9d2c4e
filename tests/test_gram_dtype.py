"""The Gram matrix in lower precision: float32 unchanged to the bit, bfloat16 within a stated error of float64.

bfloat16 keeps 8 significant bits: unit roundoff u = 2⁻⁸. Every input is rounded once (relative error ≤ u), every
product of two of them is accumulated in float32 inside the matrix product and every chunk's product rounded once
to bfloat16 (≤ u of that chunk's Σ|x_i x_j|), so each entry is within (3u + 3u²) · (|X|ᵀ|X|)_ij of the exact XᵀX,
whatever the inputs; that bound is tested entry by entry. Typical errors are far smaller, since rounding errors of
many tokens cancel: relative Frobenius errors (measured on 16384 tokens, chunks of 1024) of 5.3e-4 on correlated
inputs; the tolerance below is 1e-3.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.base import Target
from methods.gptq import GPTQ
from methods.obs import HessianSweep
from methods.quant import QuantSpec
from methods.scores import Scorer
from methods.sparsegpt import SparseGPT
from methods.statistics import Gram

UNIT_ROUNDOFF = 2.0**-8  # bfloat16: 8 significant bits
RELATIVE_TOLERANCE = 1e-3
TOKENS, COLUMNS = 16384, 256


def correlated_inputs(tokens: int = TOKENS, columns: int = COLUMNS, outliers: int = 0, seed: int = 0) -> torch.Tensor:
    """Correlated, unevenly scaled features; `outliers` channels 100x larger than the rest (SmolLM2's few
    activation channels that dwarf the others)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    inputs = (torch.randn(tokens, columns, generator=generator) @ mixing) * (torch.rand(columns, generator=generator)
                                                                              * 3 + 0.1)
    inputs[:, torch.randperm(columns, generator=generator)[:outliers]] *= 100.0
    return inputs


def accumulated(inputs: torch.Tensor, gram_dtype: str, micro_batch: int = 2048) -> Gram:
    gram = Gram(nn.Linear(inputs.shape[1], 4, bias=False), gram_dtype)
    for part in inputs.split(micro_batch):
        gram.update(part)
    return gram


def relative_error(gram: torch.Tensor, inputs: torch.Tensor) -> float:
    exact = inputs.double().T @ inputs.double()
    return float((gram.double() - exact).norm() / exact.norm())


def assert_within_rounding_bound(gram: torch.Tensor, inputs: torch.Tensor) -> None:
    exact = inputs.double().T @ inputs.double()
    magnitude = inputs.double().abs().T @ inputs.double().abs()
    excess = (gram.double() - exact).abs() - (3 * UNIT_ROUNDOFF + 3 * UNIT_ROUNDOFF**2) * magnitude
    assert float(excess.max()) <= 1e-6 * float(magnitude.max()), float(excess.max())  # float32 summation's share


@pytest.mark.parametrize("inputs_dtype", [torch.float32, torch.bfloat16])
def test_float32_and_cpu_tf32_accumulate_as_a_plain_float32_product_did(inputs_dtype):
    inputs = correlated_inputs(4096).to(inputs_dtype)
    reference = torch.zeros(COLUMNS, COLUMNS)
    for part in inputs.split(1000):
        flat = part.float()
        reference.addmm_(flat.T, flat)
    for gram_dtype in ("float32", "tf32"):  # a CPU has no TF32: the same float32 product
        gram = Gram(nn.Linear(COLUMNS, 4, bias=False), gram_dtype)
        for part in inputs.split(1000):
            gram.update(part.unsqueeze(0))
        assert torch.equal(gram.gram, reference), gram_dtype
        assert gram.tokens == 4096


@pytest.mark.parametrize("outliers", [0, 4])
def test_bfloat16_gram_is_within_the_stated_error_of_the_exact_one(outliers):
    inputs = correlated_inputs(outliers=outliers)
    low = accumulated(inputs, "bfloat16")
    assert low.gram.dtype == torch.float32 and low.tokens == TOKENS
    assert relative_error(low.gram, inputs) < RELATIVE_TOLERANCE
    assert_within_rounding_bound(low.gram, inputs)
    assert relative_error(accumulated(inputs, "float32").gram, inputs) < 1e-6


def test_bfloat16_products_are_chunked_however_large_the_micro_batch():
    """One product over 16384 tokens, rounded once, is off by 1.7e-3; the chunks keep the error where it is for
    small micro-batches."""
    inputs = correlated_inputs()
    whole = inputs.bfloat16()
    assert relative_error(whole.T @ whole, inputs) > 1.5 * RELATIVE_TOLERANCE
    assert relative_error(accumulated(inputs, "bfloat16", micro_batch=TOKENS).gram, inputs) < RELATIVE_TOLERANCE


def test_bfloat16_gram_of_wide_layers_is_accumulated_in_panels():
    """Fewer tokens than columns: three column panels per chunk, every entry within the bound. (With so few
    tokens the off-diagonal entries, each off by a fraction of u, dominate: 2.3e-3 relative.)"""
    inputs = correlated_inputs(tokens=600, columns=1500)
    gram = accumulated(inputs, "bfloat16", micro_batch=600)
    assert_within_rounding_bound(gram.gram, inputs)
    assert relative_error(gram.gram, inputs) < 2 * UNIT_ROUNDOFF


def test_bfloat16_gram_makes_the_lower_triangle_and_reads_back_exactly_symmetric():
    """Chunks of different widths (more and fewer tokens than a panel has columns) make different entries above
    the diagonal; the Gram read back is every entry below mirrored, also when read between updates."""
    inputs = correlated_inputs(tokens=2100, columns=1100)
    gram = Gram(nn.Linear(1100, 4, bias=False), "bfloat16")
    for seen, part in enumerate(inputs.split([1024, 300, 7, 769])):
        gram.update(part)
        if seen == 1:
            assert torch.equal(gram.gram, gram.gram.T)
    assert torch.equal(gram.gram, gram.gram.T)
    assert_within_rounding_bound(gram.gram, inputs)
    assert relative_error(gram.gram, inputs) < 2 * UNIT_ROUNDOFF
    whole = 1100 * 1100
    assert Gram.lower_entries(1100) == 1100 * 512 + 588 * 512 + 76 * 76 < 0.75 * whole
    assert Gram.update_flops_per_token(1100, "bfloat16") == 2 * Gram.lower_entries(1100)
    assert Gram.update_flops_per_token(1100, "float32") == 2 * whole


def test_statistic_size_is_the_float32_sum_for_every_gram_dtype():
    layer = nn.Linear(576, 8, bias=False, device="meta")
    for gram_dtype in ("float32", "tf32", "bfloat16"):
        assert Gram(layer, gram_dtype).nbytes == 576 * 576 * 4


@pytest.mark.parametrize("method", [SparseGPT, GPTQ])
def test_hessian_methods_take_the_gram_dtype_and_record_it_when_not_float32(method):
    assert "gram_dtype" not in method(gram_dtype="float32").settings()  # older records (and partial runs) stay
    assert method().settings()["gram_dtype"] == "auto"
    chosen = method(gram_dtype="bfloat16")
    assert chosen.settings()["gram_dtype"] == "bfloat16"
    assert chosen.statistic(nn.Linear(16, 4)).gram_dtype == "bfloat16"
    cost = chosen.layer_cost(8, 16, torch.float32, chosen_target(chosen))
    assert cost.update_precision == "bfloat16" and cost.update_bytes_per_token == (2 + 2 + 4) * 16
    with pytest.raises(ValueError, match="float16"):
        method(gram_dtype="float16")


@pytest.mark.parametrize("method", [SparseGPT, GPTQ, lambda **kw: Scorer((0.5,), **kw)])
def test_auto_gram_dtype_rounds_no_input(method):
    """TF32 holds every bfloat16 and float16 value (10 mantissa bits); float32 blocks keep float32 products."""
    chosen = method(gram_dtype="auto")
    for dtype, expected in ((torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "float32")):
        assert chosen.statistic(nn.Linear(16, 4, dtype=dtype, device="meta")).gram_dtype == expected, dtype
        cost = chosen.layer_cost(8, 16, dtype, Target(sparsity=0.5))
        assert cost.update_precision == expected
        assert cost.update_flops_per_token == Gram.update_flops_per_token(16, expected)
    inputs = correlated_inputs(256, 32, outliers=2)
    for sixteen_bit in (inputs.bfloat16(), inputs.half()):  # as float32, no bit below TF32's 10 mantissa bits
        assert not (sixteen_bit.float().view(torch.int32) & (2**13 - 1)).any(), sixteen_bit.dtype


def chosen_target(method: HessianSweep) -> Target:
    return Target(quant=QuantSpec(4)) if not method.prunes else Target(sparsity=0.5)


def test_the_score_pass_takes_the_gram_dtype():
    assert Scorer((0.5,), gram_dtype="bfloat16").statistic(nn.Linear(16, 4)).gram_dtype == "bfloat16"
    with pytest.raises(ValueError, match="float16"):
        Scorer((0.5,), gram_dtype="float16")


def test_bfloat16_gram_prunes_a_layer_almost_as_the_float32_one_does():
    """The sweep on a Gram rounded at the 1e-4 level: its loss within 1% and nearly the same mask."""
    torch.manual_seed(0)
    layer = nn.Linear(COLUMNS, 64, bias=False)
    inputs = correlated_inputs(4096, outliers=4)
    results = {d: SparseGPT().compress(layer, accumulated(inputs, d), chosen_target(SparseGPT())) for d in
               ("float32", "bfloat16")}
    exact, low = results["float32"], results["bfloat16"]
    assert abs(low.info["loss"] - exact.info["loss"]) < 0.01 * exact.info["loss"]
    assert float((low.mask == exact.mask).float().mean()) > 0.97
