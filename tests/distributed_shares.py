"""A rank of the statistics test in tests/test_distributed.py, in a module of its own: a spawned process imports
it, and this one imports little (torch and the statistics) so that the two ranks start quickly."""

from __future__ import annotations

import torch
import torch.distributed as dist

from methods.statistics import ColumnNorms, Gram, Moments
from streamer.distributed import World


def combine_shares(rank: int, init: str, inputs: torch.Tensor, results: str) -> None:
    """One of two gloo ranks: accumulate this rank's half of `inputs` in each statistic, combine, save."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    layer = torch.nn.Linear(inputs.shape[-1], 3)
    statistics = {"gram": Gram(layer), "norms": ColumnNorms(layer), "moments": Moments(layer)}
    for statistic in statistics.values():
        for batch in inputs[World(rank, 2).share(len(inputs))].split(3):
            statistic.update(batch)
    World(rank, 2).combine(statistics)
    torch.save({"hessian": statistics["gram"].hessian, "norms": statistics["norms"].norms,
                "mean": statistics["moments"].mean, "variance": statistics["moments"].variance},
               f"{results}.{rank}")
    dist.destroy_process_group()
