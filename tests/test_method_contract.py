"""The contract every per-layer method in `methods.METHODS` keeps with the scheduler, the planner and the formats.

methods/base.py promises it in prose; this checks it for every registered `Method` (structured ones, like flap,
have another interface) and every target it accepts (`Method.check` decides), so that a new method is held to it
the day it is registered:
- it prunes exactly `pruned_count` weights (the sparse format sizes its values by that before any maths);
- a statistic made on the meta device says the same `nbytes` as a real one (the planner measures those);
- the result has the layer's shape and dtype, and `compress` leaves the layer as it was.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from methods import METHODS, Method, QuantSpec, Target
from methods.obs import HessianSweep

ROWS, COLUMNS = 24, 64

TARGETS = {
    "50%": Target(sparsity=0.5),
    "30%": Target(sparsity=0.3),  # 64 · 0.3 and 24 · 64 · 0.3 are not whole: the count's rounding shows
    "2:4": Target(pattern=(2, 4)),
    "w4g16": Target(quant=QuantSpec(4, 16)),
    "w3-asym-act-order-group": Target(quant=QuantSpec(3, 16, symmetric=False, act_order="group")),
    "30%+w4g16": Target(sparsity=0.3, quant=QuantSpec(4, 16)),
    "2:4+w4-asym": Target(pattern=(2, 4), quant=QuantSpec(4, None, symmetric=False)),
}


DEFAULTS: dict[str, Method] = {name: cls() for name, cls in METHODS.items() if issubclass(cls, Method)}


def variants() -> dict[str, Method]:
    """Every per-layer method with its defaults, and with the settings that change how many weights it prunes:
    the magnitude scope, and OBS blocks that do not divide the columns (each block's count is rounded on its own)."""
    instances = dict(DEFAULTS)
    for name, method in DEFAULTS.items():
        if isinstance(method, HessianSweep):
            instances[f"{name}-blocksize-24"] = replace(method, blocksize=24)
    instances["magnitude-row"] = replace(DEFAULTS["magnitude"], scope="row")
    return instances


def accepted(method: Method, target: Target) -> bool:
    try:
        method.check(target)
    except ValueError:
        return False
    return True


CASES = [
    pytest.param(method, target, id=f"{method_name}-{target_name}")
    for method_name, method in variants().items()
    for target_name, target in TARGETS.items()
    if accepted(method, target)
]


def precomputed_for(method: Method, weight: torch.Tensor, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every precomputed per-weight tensor the method names (each the weight's shape, see Method.precomputed)."""
    generator = torch.Generator().manual_seed(7)
    return {name: torch.rand(weight.shape, generator=generator).to(device) for name in method.precomputed}


def observed_layer(method: Method, dtype: torch.dtype) -> tuple[nn.Linear, object]:
    """A small random layer (with a bias) and the method's statistic fed random calibration inputs."""
    torch.manual_seed(0)
    layer = nn.Linear(COLUMNS, ROWS, bias=True).to(dtype)
    statistic = method.statistic(layer, **precomputed_for(method, layer.weight))
    if statistic is not None:
        inputs = torch.randn(3, 40, COLUMNS).to(dtype)
        for batch in inputs:
            statistic.update(batch)
    return layer, statistic


def test_every_per_layer_method_is_checked():
    """The contract covers what METHODS registers: a per-layer method added there is tested here."""
    assert {case.values[0].name for case in CASES} == set(DEFAULTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("method,target", CASES)
def test_method_keeps_the_contract(method: Method, target: Target, dtype: torch.dtype):
    layer, statistic = observed_layer(method, dtype)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()

    result = method.compress(layer, statistic, target)

    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias), "compress must not modify the layer"
    assert result.weight.dtype == dtype and result.weight.shape == (ROWS, COLUMNS)
    count = method.pruned_count(ROWS, COLUMNS, target)
    assert count is not None, f"{method.name} cannot say how many weights it prunes: --format sparse refuses it"
    mask = torch.zeros(ROWS, COLUMNS, dtype=torch.bool) if result.mask is None else result.mask
    assert int(mask.sum()) == count
    assert (result.weight[mask] == 0).all(), "pruned weights must be exactly 0"
    zeros = int((result.weight == 0).sum())
    if target.quant is None:
        assert zeros == count, "a kept weight came out as 0"
    else:
        assert zeros >= count  # a kept weight may be rounded to 0, the grid's zero point


@pytest.mark.parametrize("method", [pytest.param(method, id=name) for name, method in DEFAULTS.items()])
def test_statistic_on_the_meta_device_says_the_real_size(method: Method):
    """The planner sizes a statistic from one made on the meta device; it must hold what a fed one holds."""
    layer, statistic = observed_layer(method, torch.float32)
    meta_layer = nn.Linear(COLUMNS, ROWS, device="meta")
    meta = method.statistic(meta_layer, **precomputed_for(method, meta_layer.weight, "meta"))
    if statistic is None:
        assert meta is None
        return
    assert meta.nbytes == statistic.nbytes > 0
