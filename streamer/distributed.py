"""The ranks of a torchrun job, for the block loop: who holds which windows, who solves which layer, who writes.

Under `torchrun` (WORLD_SIZE, RANK, LOCAL_RANK in the environment) every process holds a contiguous share of the
calibration windows; what the methods accumulate from them is summed across ranks (`World.combine`), the layers of
a block are solved on the ranks `World.assign` gives them and their results are broadcast (`World.broadcast`), so
every rank propagates its own windows through the same compressed block. Rank 0 writes the output and the journal.
Without torchrun the world is one process and every call here is a no-op: the code path is the same.

Collectives time out (LAYERPRESS_COLLECTIVE_TIMEOUT seconds, default 1800), so a rank whose peer died stops
instead of waiting forever; torchrun then ends the job.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from methods.base import Statistic

from .errors import LayerpressError

DEFAULT_TIMEOUT_SECONDS = 1800


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank `rank` of `size` (size 1: no torchrun, nothing to exchange)."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        """The one rank that writes shards, config and journal."""
        return self.rank == 0

    def share(self, windows: int) -> slice:
        """This rank's contiguous share of `windows` (the first `windows % size` ranks hold one more)."""
        if windows < self.size:
            raise LayerpressError(f"{windows} calibration windows cannot be shared by {self.size} ranks: give at "
                                  f"least one window per rank (--nsamples {self.size} or more)")
        base, extra = divmod(windows, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over every rank, in place (the collective's order is fixed for a world size, so every
        rank gets the same bits, run after run); returned for convenience."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Each tensor replaced, in place, by its mean over the ranks (gradients of one training step)."""
        for tensor in tensors:
            self.total(tensor).div_(self.size)

    def combine(self, statistics: dict[str, Statistic]) -> None:
        """Make each rank's accumulators hold what every rank observed (the layers in sorted order on every rank;
        a statistic that several layers share, as q/k/v do, once)."""
        if self.distributed:
            combined: set[int] = set()
            for name in sorted(statistics):
                if id(statistics[name]) not in combined:
                    combined.add(id(statistics[name]))
                    statistics[name].combine(self.total)

    def broadcast(self, value: Any, owner: int) -> Any:
        """`value` as rank `owner` has it, on every rank (tensors travel through the host)."""
        if not self.distributed:
            return value
        box = [_to_host(value) if self.rank == owner else None]
        dist.broadcast_object_list(box, src=owner)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank (small objects: paths, counts)."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def assign(self, costs: dict[str, float]) -> dict[str, int]:
        """A rank for every item, balancing the summed cost: the costliest first, each to the least loaded rank
        (ties to the lower rank), so every rank computes the same assignment."""
        loads = [(0.0, rank) for rank in range(self.size)]
        owners = {}
        for name in sorted(costs, key=lambda name: (-costs[name], name)):
            load, rank = heapq.heappop(loads)
            owners[name] = rank
            heapq.heappush(loads, (load + costs[name], rank))
        return owners

    def own(self, directory: Path) -> Path:
        """This rank's subdirectory of a directory every rank is given (its activation files apart)."""
        return directory / f"rank{self.rank}" if self.distributed else directory

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"


def _to_host(value: Any) -> Any:
    """`value` with its tensors (in dataclasses, dicts, lists) on the host, for pickling across ranks."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _to_host(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(item) for item in value)
    if hasattr(value, "__dataclass_fields__"):
        return type(value)(**{name: _to_host(getattr(value, name)) for name in value.__dataclass_fields__})
    return value


def collective_timeout() -> timedelta:
    text = os.environ.get("LAYERPRESS_COLLECTIVE_TIMEOUT", str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = float(text)
    except ValueError:
        raise LayerpressError(f"LAYERPRESS_COLLECTIVE_TIMEOUT must be a number of seconds, not {text!r}") from None
    return timedelta(seconds=seconds)


def launched_ranks() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_label() -> str:
    """'rank R of N: ' under torchrun, for error lines; '' otherwise (read from the environment, so that it also
    names a rank that failed to join)."""
    size = launched_ranks()
    return f"rank {os.environ.get('RANK', '?')} of {size}: " if size > 1 else ""


@cache
def world() -> World:
    """The world of this process: joined on first use when torchrun started it (gloo on CPU, NCCL with CUDA)."""
    size = launched_ranks()
    if size == 1:
        return World()
    rank = int(os.environ["RANK"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=collective_timeout())
    except (RuntimeError, ValueError) as exc:
        raise LayerpressError(f"cannot join the torchrun job ({backend}): {exc}") from exc
    return World(rank, size)


def leave_world() -> None:
    """Close the process group (at exit; a no-op without torchrun)."""
    if world.cache_info().currsize and world().distributed and dist.is_initialized():
        dist.destroy_process_group()
