"""What a compressing command writes: the output's tensors planned up front, each block's encoded, config.json.

    plan: every compressed weight's LayerPlan (shape, dtype, grid, exact kept count) ─► the output's TensorSpecs
    write: everything outside the blocks copied bit for bit first, then block by block as the blocks finish
    finish: config.json (the input's, with the layerpress record), side files, the index last, the journal closed

The shards themselves are streamer/writer.py's; how one compressed layer is stored is streamer/formats.py's.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from methods import LayerResult, Method, Target

from .errors import LayerpressError
from .files import atomic_write
from .formats import Format, LayerPlan, compressed_tensors_config
from .journal import Run
from .model import StagedModel
from .writer import ShardWriter, TensorSpec, WriterState, copy_side_files

log = logging.getLogger("layerpress")


def layer_plans(
    staged: StagedModel, method: Method, target_for: Callable[[str], Target]
) -> dict[str, LayerPlan]:
    """What the output stage knows of every compressed weight up front, by checkpoint name."""
    plans = {}
    for index in range(staged.num_blocks):
        for linear, name in staged.linear_weight_names(index).items():
            target = target_for(staged.layer_name(index, linear))
            entry = staged.checkpoint.entries[name]
            rows, columns = entry.shape
            pruned = method.pruned_count(rows, columns, target)
            kept = None if pruned is None else rows * columns - pruned
            plans[name] = LayerPlan(name, entry.dtype, (rows, columns), staged.dtype, target.quant, kept)
    return plans


def check_plans(fmt: Format, plans: dict[str, LayerPlan]) -> None:
    """Refuse, before anything is written, a format that cannot hold these layers."""
    for plan in plans.values():
        fmt.check(plan)
    if fmt.name != "dense" and len({plan.dtype for plan in plans.values()}) > 1:
        raise LayerpressError(f"--format {fmt.name} needs all compressed weights in one dtype; use --format dense")


def output_specs(
    staged: StagedModel, encoded: Callable[[str], list[TensorSpec] | None] = lambda name: None,
    block_specs: Callable[[int], list[TensorSpec]] | None = None,
) -> list[TensorSpec]:
    """The output tensors in write order: everything outside the blocks first, then block by block.

    encoded: the tensors a format writes for a checkpoint tensor (None: the tensor as it is); block_specs: the
    tensors of a block when its shapes differ from the checkpoint's (structured pruning)."""
    specs = [TensorSpec(name, *staged.tensor_spec(name)) for name in staged.non_block_checkpoint_names()]
    for index in range(staged.num_blocks):
        if block_specs is not None:
            specs += block_specs(index)
            continue
        for name in staged.block_checkpoint_names(index):
            specs += encoded(name) or [TensorSpec(name, *staged.tensor_spec(name))]
    return specs


def encoded_block_state(
    staged: StagedModel, index: int, fmt: Format, plans: dict[str, LayerPlan], results: dict[str, LayerResult]
) -> dict[str, torch.Tensor]:
    """Block `index`'s output tensors in write order: each compressed weight as `fmt` writes it, the rest as is."""
    by_weight = {weight: results[linear] for linear, weight in staged.linear_weight_names(index).items()}
    tensors = {}
    for name, tensor in staged.block_state(index).items():
        tensors.update(fmt.encode(plans[name], tensor, by_weight[name]) if name in plans else {name: tensor})
    return tensors


def output_config(staged: StagedModel, fmt: Format, plans: dict[str, LayerPlan], record: dict) -> dict[str, Any]:
    """config.json of the output: the input's, with the layerpress record and what a reader of `fmt` needs."""
    config = {**staged.checkpoint.config, **staged.config_changes}
    config["layerpress"] = dict(record)
    if fmt.name != "dense":
        config["layerpress"]["weight_dtype"] = str(next(iter(plans.values())).dtype).removeprefix("torch.")
    if fmt.name == "packed":
        specs = {staged.layer_name(index, linear): plans[weight].quant for index in range(staged.num_blocks)
                 for linear, weight in staged.linear_weight_names(index).items()}
        config["quantization_config"] = compressed_tensors_config(specs, staged.uncompressed_linear_modules())
    return config


def reconstruction_summary(blocks: dict[str, dict], model_parameters: int) -> dict[str, Any]:
    """Totals over the blocks' reconstruction reports, for config.json."""
    trained = sum(block["trained"] for block in blocks.values())
    return {
        "trained_parameters": trained,
        "fraction_of_block_parameters": trained / max(sum(block["total"] for block in blocks.values()), 1),
        "fraction_of_model_parameters": trained / max(model_parameters, 1),
    }


@contextmanager
def resumed_writer(out: Path, specs: list[TensorSpec], max_shard_bytes: int, run: Run) -> Iterator[ShardWriter]:
    """The output's shard writer, at the point the journal records (a fresh one for a fresh run); closed after."""
    state = WriterState(**run.body["writer"]) if "writer" in run.body else None
    writer = ShardWriter(out, specs, max_shard_bytes, state)
    try:
        yield writer
    finally:
        writer.close()


@contextmanager
def model_output(out: Path, staged: StagedModel, specs: list[TensorSpec], max_shard_bytes: int,
                 run: Run) -> Iterator[ShardWriter]:
    """The shard writer of a compressed model, with everything outside the blocks already copied bit for bit."""
    with resumed_writer(out, specs, max_shard_bytes, run) as writer:
        non_block = staged.non_block_checkpoint_names()
        while writer.state.written < len(non_block):  # before the first block
            name = non_block[writer.state.written]
            writer.write(name, staged.read_for_copy(name))
        yield writer


def write_block(writer: ShardWriter, tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
    """Append one block's tensors and make them durable; returns the seconds it took."""
    clock = time.perf_counter()
    for name, tensor in tensors:
        writer.write(name, tensor)
    writer.sync()
    return time.perf_counter() - clock


def finish_output(out: Path, source: Path, run: Run, writer: ShardWriter, config: dict, started: float,
                  bytes_read: int) -> None:
    """Config, side files and index (the index last: only now does the output load), then close the journal."""
    atomic_write(out / "config.json", json.dumps(config, indent=2).encode())
    copy_side_files(source, out)
    writer.write_index()
    run.finish({"seconds": time.perf_counter() - started, "bytes_written": writer.bytes_written,
                "bytes_read": bytes_read})
    log.info("wrote %s (%d shards)", out, len(writer.shards))
