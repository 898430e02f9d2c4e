"""The OBS sweep never waits on the device per column: its host synchronisations per layer are a constant.

One host read per column (tools/host_syncs.py says what counts as one) would make a GPU sweep latency-bound; the
kernels launched per column are what the planner's cost model counts (`kernels_per_column`).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.base import Target
from methods.gptq import GPTQ
from methods.obs import HessianSweep, kernels_per_column
from methods.quant import QuantSpec
from methods.scores import score_layer
from methods.sparsegpt import SparseGPT
from methods.statistics import Gram
from tools.host_syncs import HostSyncs, counting_host_syncs


def layer_and_gram(columns: int, rows: int = 32, seed: int = 0) -> tuple[nn.Linear, Gram]:
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(columns, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, columns, generator=generator))
    gram = Gram(layer)
    inputs = torch.randn(2 * columns, columns, generator=generator) * (torch.rand(columns, generator=generator) + 0.1)
    inputs[:, 3] = 0.0  # a dead input: its weights are zeroed
    gram.update(inputs)
    return layer, gram


GROUPED = QuantSpec(4, 32)
CASES: dict[str, tuple[HessianSweep, Target]] = {
    "sparsegpt-50%": (SparseGPT(), Target(sparsity=0.5)),
    "sparsegpt-2:4": (SparseGPT(), Target(pattern=(2, 4))),
    "sparsegpt-50%-w4": (SparseGPT(), Target(0.5, quant=QuantSpec(4))),
    "sparsegpt-50%-w4g32": (SparseGPT(), Target(0.5, quant=GROUPED)),
    "sparsegpt-50%-w4g32-act-weight": (SparseGPT(), Target(0.5, quant=QuantSpec(4, 32, act_order="weight"))),
    "sparsegpt-50%-w4g32-act-group": (SparseGPT(), Target(0.5, quant=QuantSpec(4, 32, act_order="group"))),
    "sparsegpt-2:4-w4g32": (SparseGPT(), Target(pattern=(2, 4), quant=GROUPED)),
    "gptq-w4": (GPTQ(), Target(quant=QuantSpec(4))),
    "gptq-w4-asym-act": (GPTQ(), Target(quant=QuantSpec(4, symmetric=False, act_order="weight"))),
    "gptq-w4g32": (GPTQ(), Target(quant=GROUPED)),
    "gptq-w4g32-act-weight": (GPTQ(), Target(quant=QuantSpec(4, 32, act_order="weight"))),
    "gptq-w4g32-act-group": (GPTQ(), Target(quant=QuantSpec(4, 32, act_order="group"))),
}
COLUMNS = (128, 512)  # one block of 128 columns and four groups of 32, then four blocks and sixteen groups


def syncs_of_compress(method: HessianSweep, target: Target, columns: int) -> HostSyncs:
    layer, gram = layer_and_gram(columns)
    with counting_host_syncs() as syncs:
        method.compress(layer, gram, target)
    return syncs


@pytest.mark.parametrize("case", CASES)
def test_compress_makes_as_many_host_syncs_for_512_columns_as_for_128(case):
    method, target = CASES[case]
    narrow, wide = (syncs_of_compress(method, target, columns) for columns in COLUMNS)
    assert narrow.counts == wide.counts, f"{case}: {dict(narrow.counts)} at 128 columns, {dict(wide.counts)} at 512"
    assert wide.total <= 6, f"{case}: {dict(wide.counts)}"  # the factorization's checks and the loss, no more


@pytest.mark.parametrize("case", CASES)
def test_the_planner_counts_the_kernels_the_sweep_launches_per_column(case):
    method, target = CASES[case]
    columns = COLUMNS[-1]
    launched = syncs_of_compress(method, target, columns).kernels / columns
    assert abs(launched - kernels_per_column(target)) < 1, f"{case}: {launched:.2f} kernels per column"


def test_the_score_pass_sweep_makes_a_constant_number_of_host_syncs():
    counts = []
    for columns in COLUMNS:
        layer, gram = layer_and_gram(columns)
        with counting_host_syncs() as syncs:
            score_layer(layer, gram, (0.5, 0.7), 0.01, 128)
        counts.append(syncs.counts)
    assert counts[0] == counts[1], counts


def test_the_counter_sees_every_kind_of_host_read():
    values = torch.randn(8, 8)
    with counting_host_syncs() as syncs:
        values.sum().item()
        bool((values > 0).any())
        values[:, values[0] > 0] = 0.0
        values[values > 1].sum()
        values[0].tolist()
        values.masked_fill(values > 0, 0.0)  # not a read
        values[:, torch.tensor([1, 2])]  # not a read: integer indices keep their size
    assert syncs.counts == {"aten._local_scalar_dense": 2, "aten.index_put_": 1, "aten.index": 1, "tolist": 1}, (
        dict(syncs.counts))
