"""Counting what a piece of torch code would make a GPU do: host synchronisations (by op) and kernel launches.

On CUDA every read of a device value by the host (`.item()`, `bool(tensor)`, `.tolist()`, boolean-mask indexing,
which needs the count of True entries to size its result) stalls the launch queue until the device catches up. On
the CPU nothing stalls, but the same reads go through torch's dispatcher, so a dispatch mode counts them as they
would happen on a GPU (tests/test_sync_count.py, tools/bench_gram.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Ops whose result size or value the host must read from the device before it can go on.
READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim,
         aten.unique_consecutive, aten.repeat_interleave}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _is_mask(index: object) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


class HostSyncs(TorchDispatchMode):
    """Counts, by op, the host synchronisations a CUDA run of the code inside would make, and the kernels it would
    launch (every op but views and the host's own wrapping of Python scalars)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        packet = func.overloadpacket
        if packet in READS or (packet in INDEXING and any(_is_mask(i) for i in args[1] if i is not None)):
            self.counts[str(packet)] += 1
        self.kernels += not func.is_view and packet is not aten.scalar_tensor
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
