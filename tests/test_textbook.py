"""Our methods against the textbook versions in tests/textbook.py, tensor by tensor, on tiny layers.

Masks, grid integers, zero points and groups must be identical. Weights and scales are compared with a tolerance:
our sweep runs in float32 by design (XᵀX accumulated, factored and swept in float32, as the reference code does),
the textbook in float64. Over these few dozen columns float32 leaves the weights within 3e-6 of the largest one
(measured: at most 4.3e-7 on weights of at most 0.18), so TOLERANCE (1e-5 of the largest weight, relative for
scales; the dtype's own rounding for bfloat16 layers) is three times that, and hundreds of times below what any
real difference makes: a wrong mask moves a weight by itself and its compensation, a wrong grid integer by a whole
step (a row's largest weight / 7.5 at 4 bits, / 127.5 at 8), a missing update by its OBS correction. Blocks of
8, 12 and 20 columns against 32 and 48 make the lazy updates (and groups that straddle two blocks) matter; the
textbook has no lazy batching at all.

Where a value lies halfway between two grid integers (to within that tolerance) both are nearest, and float
rounding, not the maths, picks one: the symmetric grid puts −max|w| there by construction. There the textbook
takes our integer, after checking it is one of the two (textbook.Midpoints): 98 of about 20,000 roundings here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods import METHODS, LayerResult, QuantSpec, Target
from tests import textbook
from tests.test_methods import correlated_inputs

TOLERANCE = 1e-5
SPARSE = {"50%": Target(sparsity=0.5), "30%": Target(sparsity=0.3), "0%": Target(sparsity=0.0),
          "2:4": Target(pattern=(2, 4))}
SHAPES = {"16x32": (16, 32), "8x48": (8, 48)}


def tiny_layer(rows: int, columns: int, dtype: torch.dtype = torch.float32, seed: int = 0,
               dead: int | None = None) -> tuple[nn.Linear, torch.Tensor]:
    """A random layer and 256 calibration tokens of correlated features, a few of them large (as in LLMs);
    `dead`: an input that is always 0."""
    torch.manual_seed(seed)
    layer = nn.Linear(columns, rows, bias=False).to(dtype)
    inputs = correlated_inputs(columns, 256, seed)
    if dead is not None:
        inputs[:, dead] = 0.0
    return layer, inputs


def ours(name: str, layer: nn.Linear, inputs: torch.Tensor, target: Target, **settings) -> LayerResult:
    method = METHODS[name](**settings)
    statistic = method.statistic(layer)
    if statistic is not None:
        for batch in inputs.split(100):
            statistic.update(batch)
    return method.compress(layer, statistic, target)


def midpoints(result: LayerResult, layer: nn.Linear) -> textbook.Midpoints | None:
    """Where a value is halfway between two grid integers, to within the comparison's tolerance, both are nearest
    and float rounding picks one: the textbook takes the method's choice there (and checks it is one of the two)."""
    if result.quant is None:
        return None
    return textbook.Midpoints(result.quant.ints, TOLERANCE * layer.weight.abs().max().item())


def textbook_sweep(result: LayerResult, layer: nn.Linear, inputs: torch.Tensor, target: Target,
                   blocksize: int) -> textbook.Swept:
    """The textbook SparseGPT (or without pruning GPTQ, which has no blocks) of what `result` was made from."""
    weight, dtype, ties = layer.weight.detach(), layer.weight.dtype, midpoints(result, layer)
    if target.is_dense:
        return textbook.gptq(weight, inputs, target.quant, dtype, ties)
    return textbook.sparsegpt(weight, inputs, target, blocksize, dtype, ties)


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, scale: float, dtype: torch.dtype) -> None:
    """Within TOLERANCE · scale, or the dtype's own rounding where that is coarser (bfloat16)."""
    atol = max(TOLERANCE, torch.finfo(dtype).eps) * scale
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=atol)


def assert_matches(result: LayerResult, expected: textbook.Swept, layer: nn.Linear) -> None:
    assert torch.equal(result.mask, expected.mask), "masks differ"
    if expected.ints is not None:
        record = result.quant
        assert torch.equal(record.g_idx.long(), expected.g_idx), "groups differ"
        assert torch.equal(record.zero.long(), expected.zero), "zero points differ"
        assert torch.equal(record.ints.long(), expected.ints), f"{int((record.ints.long() != expected.ints).sum())} " \
            "grid integers differ"
        torch.testing.assert_close(record.scale.double(), expected.scale, rtol=TOLERANCE, atol=0)
    assert_close_to(result.weight, expected.weight, layer.weight.abs().max().item(), layer.weight.dtype)


@pytest.mark.parametrize("scope", ["matrix", "row"])
@pytest.mark.parametrize("target", SPARSE.values(), ids=SPARSE.keys())
def test_magnitude_is_the_textbook_one(target, scope):
    layer, _ = tiny_layer(16, 32)
    result = ours("magnitude", layer, torch.empty(0, 32), target, scope=scope)
    weight, mask = textbook.magnitude(layer.weight.detach(), target, scope)
    assert torch.equal(result.mask, mask)
    assert torch.equal(result.weight.double(), weight)  # no arithmetic: the kept weights are the layer's own


@pytest.mark.parametrize("target", SPARSE.values(), ids=SPARSE.keys())
def test_wanda_is_the_textbook_one(target):
    layer, inputs = tiny_layer(16, 32)
    result = ours("wanda", layer, inputs, target)
    weight, mask = textbook.wanda(layer.weight.detach(), inputs, target)
    assert torch.equal(result.mask, mask)
    assert torch.equal(result.weight.double(), weight)


@pytest.mark.parametrize("shape,blocksize", [("16x32", 8), ("16x32", 12), ("16x32", 32), ("8x48", 20), ("8x48", 48)])
@pytest.mark.parametrize("target", SPARSE.values(), ids=SPARSE.keys())
def test_sparsegpt_is_the_textbook_sweep(target, shape, blocksize):
    layer, inputs = tiny_layer(*SHAPES[shape])
    result = ours("sparsegpt", layer, inputs, target, blocksize=blocksize)
    assert_matches(result, textbook_sweep(result, layer, inputs, target, blocksize), layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_sparsegpt_with_a_dead_input_is_the_textbook_sweep(dtype):
    layer, inputs = tiny_layer(16, 32, dtype, dead=5)
    result = ours("sparsegpt", layer, inputs, Target(sparsity=0.5), blocksize=12)
    assert_matches(result, textbook_sweep(result, layer, inputs, Target(sparsity=0.5), 12), layer)


GRIDS = {
    "w4-row": QuantSpec(4, None),
    "w4-row-asym": QuantSpec(4, None, symmetric=False),
    "w3-g8-asym": QuantSpec(3, 8, symmetric=False),
    "w4-g12": QuantSpec(4, 12),
    "w2-g16-asym": QuantSpec(2, 16, symmetric=False),
    "w8-g12": QuantSpec(8, 12),
    "w4-row-act-order": QuantSpec(4, None, act_order="weight"),
    "w3-g8-asym-act-order-weight": QuantSpec(3, 8, symmetric=False, act_order="weight"),
    "w3-g12-asym-act-order-group": QuantSpec(3, 12, symmetric=False, act_order="group"),
}


@pytest.mark.parametrize("blocksize", [12, 128])  # groups of 8 straddle blocks of 12
@pytest.mark.parametrize("spec", GRIDS.values(), ids=GRIDS.keys())
def test_gptq_is_the_textbook_sweep(spec, blocksize):
    layer, inputs = tiny_layer(16, 32)
    result = ours("gptq", layer, inputs, Target(quant=spec), blocksize=blocksize)
    assert_matches(result, textbook_sweep(result, layer, inputs, Target(quant=spec), blocksize), layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gptq_on_a_half_precision_layer_with_a_dead_input_is_the_textbook_sweep(dtype):
    """Scales are rounded to the layer's dtype when fitted: the grid rounded onto is the one stored."""
    layer, inputs = tiny_layer(8, 48, dtype, seed=1, dead=0)
    spec = QuantSpec(4, 16, symmetric=False, act_order="group")
    result = ours("gptq", layer, inputs, Target(quant=spec), blocksize=20)
    assert_matches(result, textbook_sweep(result, layer, inputs, Target(quant=spec), 20), layer)


JOINT = {
    "50%-w4-g12-asym": Target(sparsity=0.5, quant=QuantSpec(4, 12, symmetric=False)),
    "50%-w4-g8": Target(sparsity=0.5, quant=QuantSpec(4, 8)),
    "30%-w3-row": Target(sparsity=0.3, quant=QuantSpec(3, None)),
    "2:4-w4-g12-asym": Target(pattern=(2, 4), quant=QuantSpec(4, 12, symmetric=False)),
    "2:4-w3-row-asym": Target(pattern=(2, 4), quant=QuantSpec(3, None, symmetric=False)),
    "50%-w3-g12-asym-act-order-group": Target(sparsity=0.5, quant=QuantSpec(3, 12, False, "group")),
    "50%-w3-g12-asym-act-order-weight": Target(sparsity=0.5, quant=QuantSpec(3, 12, False, "weight")),
}


@pytest.mark.parametrize("blocksize", [8, 12, 32])  # groups of 12 straddle blocks of 8, groups of 8 blocks of 12
@pytest.mark.parametrize("target", JOINT.values(), ids=JOINT.keys())
def test_joint_sparsegpt_is_the_textbook_sweep(target, blocksize):
    """Pruning and rounding in one sweep; a group's grid fitted, when the sweep reaches it, to what it keeps."""
    layer, inputs = tiny_layer(16, 32)
    result = ours("sparsegpt", layer, inputs, target, blocksize=blocksize)
    assert_matches(result, textbook_sweep(result, layer, inputs, target, blocksize), layer)
