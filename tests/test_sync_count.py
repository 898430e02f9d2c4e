"""The OBS sweep never waits on the device per column: its host synchronisations per layer are a constant.

On CUDA every read of a device value by the host (`.item()`, `bool(tensor)`, `.tolist()`, boolean-mask indexing,
which needs the count of True entries to size its result) stalls the launch queue until the device catches up; one
such read per column makes the sweep latency-bound. On the CPU nothing stalls, but the same reads go through
torch's dispatcher, so a dispatch mode counts them here as they would happen on a GPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from methods.base import Target
from methods.gptq import GPTQ
from methods.obs import HessianSweep
from methods.quant import QuantSpec
from methods.scores import score_layer
from methods.sparsegpt import SparseGPT
from methods.statistics import Gram

aten = torch.ops.aten
# Ops whose result size or value the host must read from the device before it can go on.
READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim,
         aten.unique_consecutive, aten.repeat_interleave}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _is_mask(index: object) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


class HostSyncs(TorchDispatchMode):
    """Counts, by op, the host synchronisations a CUDA run of the code inside would make."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        packet = func.overloadpacket
        if packet in READS or (packet in INDEXING and any(_is_mask(i) for i in args[1] if i is not None)):
            self.counts[str(packet)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextmanager
def counting_host_syncs() -> Iterator[HostSyncs]:
    """A HostSyncs mode that also counts `Tensor.tolist` (a device-to-host copy that the dispatcher does not see
    on the CPU)."""
    mode, tolist = HostSyncs(), torch.Tensor.tolist

    def counted_tolist(tensor: torch.Tensor):  # noqa: ANN202 (a list of any depth)
        mode.counts["tolist"] += 1
        return tolist(tensor)

    torch.Tensor.tolist = counted_tolist
    try:
        with mode:
            yield mode
    finally:
        torch.Tensor.tolist = tolist


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
