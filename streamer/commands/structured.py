"""`compress` with a structured method (FLAP): passes over the blocks (the maths is the method's: methods/base.py).

    statistics pass (streamed, resumable):  each block's channel-group consumers observed on the dense model's
                                            activations -> one ChannelSummary per group, saved under .layerpress/
    search (once, in memory):               every group's unit scores at once -> which units stay, saved
    pruning pass (weights only, resumable): each block cut down to its kept units -> written at once

The pruning pass runs no activations: scores and compensation both come from the dense model, as in the FLAP
paper. One decision for the whole model needs every block's scores before any block is cut, and scores observed
on partly pruned inputs would not be comparable across blocks; the compensation b += W·mean(x_removed) is exact
for the statistics the decision was taken on. So the second pass costs one read and one write of the model.
The search holds a few numbers per channel of the whole model (no weights), so memory still follows one block.

Under torchrun the statistics pass is data-parallel like compress's: each rank observes its share of the windows,
the channel moments are pooled across ranks, rank 0 writes the summaries. The search and the pruning pass need no
activations, only summaries and weights: rank 0 runs them alone (one read and one write of the model, nothing a
second rank would shorten) while the others end.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from methods import StructuredMethod
from methods.base import ChannelSummary, UnitGroup

from ..block import observe
from ..distributed import world
from ..errors import LayerpressError
from ..files import atomic_write
from ..journal import Run
from ..model import StagedModel
from ..output import finish_output, model_output, output_specs, write_block
from ..stream import BlockContext, StreamOptions, stream_blocks, walk_blocks
from ..structure import STRUCTURE_KEY, Skeleton, build_skeleton
from ..writer import TensorSpec
from .lifecycle import open_phase

log = logging.getLogger("layerpress")

PLAN_FILE = "structure-plan.safetensors"


def compress_structured(
    method: StructuredMethod, staged: StagedModel, windows: torch.Tensor, options: StreamOptions, out: Path,
    source: Path, max_shard_bytes: int, run: Run, record: dict[str, Any],
) -> None:
    """Statistics pass, global search, pruning pass into physically smaller shards, with their structure record."""
    started = time.perf_counter()
    summaries = collect_summaries(method, staged, windows, options, run)
    if not world().is_writer:
        return
    plan = plan_units(method, staged, summaries, run)
    layout = pruned_layout(method, staged, plan)
    with model_output(out, staged, output_specs(staged, block_specs=layout.specs), max_shard_bytes, run) as writer:

        def process(index: int, block: nn.Module) -> dict[str, Any]:
            tensors = prune_block(method, staged, summaries, plan, index, block)
            kept = {f"{staged.block_prefix(index)}{name}": int(plan.keep[name][index].sum()) for name in plan.keep}
            log.info("prune: block %d/%d: units kept %s", index + 1, staged.num_blocks,
                     ", ".join(f"{name} {count}/{staged.layouts[name].units_in(block)}"
                               for name, count in zip(plan.keep, kept.values())))
            write_block(writer, layout.block_tensors(index, tensors))
            return {"writer": asdict(writer.state), "layers": kept}

        walk_blocks(staged, process, run, desc="prune")
        config = dict(staged.checkpoint.config)
        config[STRUCTURE_KEY] = layout.structure
        config["layerpress"] = {**record, "kept_units": run.body["layers"], "parameters": plan.parameters}
        finish_output(out, source, run, writer, config, started, staged.checkpoint.bytes_read)


def summary_path(directory: Path, block: int) -> Path:
    return directory / f"summary-{block:05d}.safetensors"


def collect_summaries(
    method: StructuredMethod, staged: StagedModel, windows: torch.Tensor, options: StreamOptions, run: Run
) -> Path:
    """The statistics pass over the dense model (a phase of `run`, resumable); returns where the summaries are."""
    if not staged.layouts:
        why = f": {staged.adapter.unprunable}" if staged.adapter.unprunable else ""
        raise LayerpressError(f"{staged.adapter.name} models declare no heads or channels that can be removed whole{why}")
    phase = open_phase(run, "statistics", staged.num_blocks)
    try:
        if phase.complete:
            return phase.out

        def process(context: BlockContext) -> dict[str, Any]:
            consumers = {name: context.block.get_submodule(layout.group.consumer)
                         for name, layout in staged.layouts.items()}
            statistics = {name: method.statistic(layer) for name, layer in consumers.items()}
            with context.phase("observe"):
                observe(consumers, statistics, lambda: context.forward(keep_outputs=True))
            context.propagated = True  # the block stays dense: its outputs are the next block's inputs
            ranks = world()
            ranks.combine(statistics)  # under torchrun: the moments of every rank's windows
            if not ranks.is_writer:
                return {}
            tensors = {}
            for name, layer in consumers.items():
                summary = method.summarize(layer, statistics[name])
                tensors[f"{name}.score"], tensors[f"{name}.mean"] = summary.score.cpu(), summary.mean.cpu()
            atomic_write(summary_path(phase.out, context.index), save(tensors))
            return {}

        stream_blocks(staged, windows, options, process, phase, desc="statistics")
        phase.finish({})
        return phase.out
    finally:
        phase.close()


@dataclass
class KeptUnits:
    """The search's decision: per group, one mask of kept units per block; and the parameters it keeps."""

    keep: dict[str, list[torch.Tensor]]
    parameters: dict[str, float]


def unit_groups(staged: StagedModel, summaries: Path) -> list[UnitGroup]:
    """What the search sees: every block's groups with their scores, unit counts and unit costs."""
    groups = []
    for index, block in enumerate(staged.blocks):  # the meta skeleton: shapes only, nothing is read
        with safe_open(summary_path(summaries, index), "pt") as stored:
            for name, layout in staged.layouts.items():
                groups.append(UnitGroup(index, name, stored.get_tensor(f"{name}.score"), layout.units_in(block),
                                        layout.unit_cost(block)))
    return groups


def plan_units(method: StructuredMethod, staged: StagedModel, summaries: Path, run: Run) -> KeptUnits:
    """Which units stay: searched once over all blocks' scores, saved so that a resumed pass applies the same."""
    groups = unit_groups(staged, summaries)
    path = run.work / PLAN_FILE
    if path.is_file():
        stored = load_file(path)
        masks = [stored[f"{group.name}.{group.block}"] for group in groups]
    else:
        try:
            masks = method.select(groups)
        except ValueError as exc:
            raise LayerpressError(f"{method.name}: {exc}") from exc
        for group, mask in zip(groups, masks):
            if mask.dtype != torch.bool or mask.shape != (group.units,) or not mask.any():
                raise RuntimeError(f"{method.name} kept no unit or a malformed mask for {group.name} of block "
                                   f"{group.block}")
        atomic_write(path, save({f"{group.name}.{group.block}": mask for group, mask in zip(groups, masks)}))
    keep: dict[str, list[torch.Tensor]] = {name: [] for name in staged.layouts}
    for group, mask in zip(groups, masks):
        keep[group.name].append(mask)
    prunable = sum(group.units * group.cost for group in groups)
    kept = sum(int(mask.sum()) * group.cost for group, mask in zip(groups, masks))
    parameters = {"prunable": prunable, "kept": kept, "removed_fraction": 1 - kept / prunable}
    log.info("%s keeps %d of %d prunable parameters (%.2f%% removed); units kept per block: %s", method.name, kept,
             prunable, 100 * parameters["removed_fraction"],
             {name: [int(mask.sum()) for mask in masks] for name, masks in keep.items()})
    return KeptUnits(keep, parameters)


@dataclass
class PrunedLayout:
    """The output's shapes: the per-block structure record and, per block, its tensors in write order."""

    structure: dict[str, Any]
    blocks: list[list[tuple[str, TensorSpec]]]  # (name relative to the block, output spec)

    def specs(self, index: int) -> list[TensorSpec]:
        return [spec for _, spec in self.blocks[index]]

    def block_tensors(self, index: int, tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Block `index`'s output tensors (by relative name) as (output name, tensor) in write order and dtype,
        one at a time: computing in another dtype than the checkpoint's, a list held a converted copy of the whole
        cut block (1.5 GiB of an OPT-66B block at 20%) while it was written."""
        return ((spec.name, tensors[relative].to(device="cpu", dtype=spec.dtype))
                for relative, spec in self.blocks[index])


def pruned_layout(method: StructuredMethod, staged: StagedModel, plan: KeptUnits) -> PrunedLayout:
    """The output's skeleton (same builder as every loader: streamer/structure.py) and its tensors' specs."""
    prior = getattr(staged.config, STRUCTURE_KEY, None) or {}
    biases = set(prior.get("biases", []))
    if method.adds_bias:
        biases |= {layout.group.consumer for layout in staged.layouts.values()
                   if staged.blocks[0].get_submodule(layout.group.consumer).bias is None}
    units = {**prior.get("units", {}), **{name: [int(mask.sum()) for mask in masks] for name, masks in plan.keep.items()}}
    structure = {"units": units, "biases": sorted(biases)}
    config = copy.deepcopy(staged.config)
    setattr(config, STRUCTURE_KEY, structure)
    skeleton = build_skeleton(config, staged.dtype)
    return PrunedLayout(structure, [_block_specs(staged, skeleton, index) for index in range(staged.num_blocks)])


def _block_specs(staged: StagedModel, skeleton: Skeleton, index: int) -> list[tuple[str, TensorSpec]]:
    """The pruned block's tensors: checkpoint-style names, the checkpoint's dtypes (an added bias: its weight's)."""
    entries, prefix = staged.checkpoint.entries, staged.block_prefix(index)
    specs = []
    for relative, tensor in skeleton.blocks[index].state_dict().items():
        name = staged.output_name(prefix + relative)
        source = name if name in entries else staged.output_name(prefix + relative.rpartition(".")[0] + ".weight")
        specs.append((relative, TensorSpec(name, entries[source].dtype, tuple(tensor.shape))))
    return specs


def prune_block(
    method: StructuredMethod, staged: StagedModel, summaries: Path, plan: KeptUnits, index: int, block: nn.Module
) -> dict[str, torch.Tensor]:
    """The dense block `index` cut down to its kept units: all its output tensors, by name relative to the block.

    Each group's layers take their cut weights as soon as they are made, so the dense ones are freed group by
    group: a block and its whole cut copy were alive together (OPT-66B width: the pruning pass's peak 4.40 GiB,
    now 3.80 with the block and one group's cut layers). The block is released after this; only its tensors are
    read."""
    with safe_open(summary_path(summaries, index), "pt") as stored:
        for name, layout in staged.layouts.items():
            group = layout.group
            summary = ChannelSummary(stored.get_tensor(f"{name}.score"), stored.get_tensor(f"{name}.mean"))
            producers = {path: block.get_submodule(path) for path in group.producers}
            pruned, consumer = method.prune(producers, block.get_submodule(group.consumer),
                                            plan.keep[name][index], summary)
            for path, layer in (*pruned.items(), (group.consumer, consumer)):
                dense = block.get_submodule(path)
                dense.weight = nn.Parameter(layer.weight, requires_grad=False)
                if layer.bias is not None:
                    dense.bias = nn.Parameter(layer.bias, requires_grad=False)
    return dict(block.state_dict())
