"""`compress`: the order of the phases for one block, on top of the shared block loop (streamer/stream.py).

    embed calibration windows ─► for each block: read ─► observe ─► compress ─► write ─► propagate ─► journal

Observe runs the calibration inputs through the block with hooks that feed each linear layer's inputs to the
method's statistics; compress replaces each layer's weight with the method's result; propagate runs the compressed
block to make the next block's inputs. With --true-sequential, observe and compress run once per group of layers
(q/k/v, then the output projection, ...), so each group sees inputs that already went through compressed groups.
Write hands each compressed layer to the output format (streamer/formats.py), planned before the first block.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from methods import LayerResult, Method, Target
from methods.base import Statistic

from .decompress import open_checkpoint
from .data import (
    calibration_windows,
    capped_seqlen,
    describe_source,
    load_text,
    load_tokenizer,
    tokenize,
    windows_fingerprint,
)
from .errors import LayerpressError
from .files import atomic_write
from .formats import FORMATS, Format, LayerPlan, compressed_tensors_config
from .journal import Run
from .model import StagedModel
from .stream import BlockContext, StreamOptions, stream_blocks
from .writer import ShardWriter, TensorSpec, WriterState, copy_side_files

log = logging.getLogger("layerpress")


@dataclass
class CompressSettings:
    model: Path
    out: Path
    method: Method
    target: Target
    calib: str
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    dtype: torch.dtype | None = None
    true_sequential: bool = False
    max_shard_bytes: int = 5 * 10**9
    restart: bool = False
    stream: StreamOptions = field(default_factory=StreamOptions)
    format: str = "dense"

    def record(self, seqlen: int, dtype: torch.dtype) -> dict[str, Any]:
        """Everything that changes the output: kept in the journal (resume must match) and in config.json."""
        return {
            "method": self.method.name,
            "method_settings": self.method.settings(),
            "sparsity": self.target.sparsity,
            "pattern": f"{self.target.pattern[0]}:{self.target.pattern[1]}" if self.target.pattern else None,
            "quantization": asdict(self.target.quant) if self.target.quant else None,
            "format": self.format,
            "calibration": {"source": describe_source(self.calib), "nsamples": self.nsamples, "seqlen": seqlen, "seed": self.seed},
            "dtype": str(dtype).removeprefix("torch."),
            "device": self.stream.device.type,
            "true_sequential": self.true_sequential,
            "micro_batch": self.stream.micro_batch,
            "max_shard_bytes": self.max_shard_bytes,
        }


def observe(linears: dict[str, nn.Linear], statistics: dict[str, Statistic], run_block: Callable[[], None]) -> None:
    """Run the block once with every layer's inputs fed to its statistic."""
    hooks = [
        linears[name].register_forward_pre_hook(lambda _, args, stat=stat: stat.update(args[0]))
        for name, stat in statistics.items()
    ]
    try:
        run_block()
    finally:
        for hook in hooks:
            hook.remove()


def compress_block(
    context: BlockContext, method: Method, groups: list[tuple[str, ...]], target_for: Callable[[str], Target]
) -> dict[str, LayerResult]:
    """Compress every linear layer of the block in place, group by group; returns the result per layer."""
    linears = context.linears
    results = {}
    for group in groups:
        statistics = {name: method.statistic(linears[name]) for name in group}
        active = {name: stat for name, stat in statistics.items() if stat is not None}
        if active:
            observe(linears, active, context.forward)
        for name in group:
            layer, full_name = linears[name], context.layer_name(name)
            try:
                result = method.compress(layer, statistics[name], target_for(full_name))
            except ValueError as exc:
                raise LayerpressError(f"{method.name} failed on {full_name}: {exc}") from exc
            if not torch.isfinite(result.weight).all():
                raise LayerpressError(f"{method.name} produced non-finite weights for {full_name}")
            layer.weight.data.copy_(result.weight)
            results[name] = result
    return results


def layer_plans(staged: StagedModel, method: Method, target: Target) -> dict[str, LayerPlan]:
    """What the output stage knows of every compressed weight up front, by checkpoint name."""
    plans = {}
    for index in range(staged.num_blocks):
        for name in staged.linear_weight_names(index).values():
            entry = staged.checkpoint.entries[name]
            rows, columns = entry.shape
            pruned = method.pruned_count(rows, columns, target)
            kept = None if pruned is None else rows * columns - pruned
            plans[name] = LayerPlan(name, entry.dtype, (rows, columns), staged.dtype, target.quant, kept)
    return plans


def output_specs(staged: StagedModel, fmt: Format, plans: dict[str, LayerPlan]) -> list[TensorSpec]:
    """The output tensors in write order: everything outside the blocks first, then block by block."""
    entries = staged.checkpoint.entries
    names = staged.non_block_checkpoint_names()
    for index in range(staged.num_blocks):
        names += staged.block_checkpoint_names(index)
    specs = []
    for name in names:
        if name in plans:
            specs += fmt.specs(plans[name])
        else:
            specs.append(TensorSpec(name, entries[name].dtype, entries[name].shape))
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
    config = dict(staged.checkpoint.config)
    config["layerpress"] = dict(record)
    if fmt.name != "dense":
        config["layerpress"]["weight_dtype"] = str(next(iter(plans.values())).dtype).removeprefix("torch.")
    if fmt.name == "packed":
        quant = next(iter(plans.values())).quant
        config["quantization_config"] = compressed_tensors_config(quant, staged.uncompressed_linear_modules())
    return config


def compress(settings: CompressSettings) -> Path:
    """Compress a checkpoint block by block into `settings.out`; resumes a partial run of the same settings."""
    if settings.out.resolve() == settings.model.resolve():
        raise LayerpressError("the output directory must differ from the model directory")
    checkpoint = open_checkpoint(settings.model)
    staged = StagedModel(checkpoint, settings.stream.device, settings.dtype)
    seqlen = capped_seqlen(settings.seqlen, checkpoint.config)
    tokenizer = load_tokenizer(settings.model)
    windows = calibration_windows(
        tokenize(tokenizer, load_text(settings.calib)), settings.nsamples, seqlen, settings.seed
    )
    try:
        settings.method.check(settings.target)
    except ValueError as exc:
        raise LayerpressError(str(exc)) from exc
    fmt = FORMATS[settings.format]
    plans = layer_plans(staged, settings.method, settings.target)
    check_plans(fmt, plans)
    record = settings.record(seqlen, staged.dtype)
    fingerprints = {"checkpoint": checkpoint.fingerprint(), "calibration": windows_fingerprint(windows)}
    run = Run(settings.out, "compress", record, fingerprints, staged.num_blocks, restart=settings.restart)
    try:
        if run.complete:
            log.info("%s is already complete; nothing to do (use --restart to redo it)", settings.out)
        else:
            _compress(settings, staged, windows, run, record, fmt, plans)
    finally:
        run.close()
    return settings.out


def check_plans(fmt: Format, plans: dict[str, LayerPlan]) -> None:
    """Refuse, before anything is written, a format that cannot hold these layers."""
    for plan in plans.values():
        fmt.check(plan)
    if fmt.name != "dense" and len({plan.dtype for plan in plans.values()}) > 1:
        raise LayerpressError(f"--format {fmt.name} needs all compressed weights in one dtype; use --format dense")


def _compress(
    settings: CompressSettings, staged: StagedModel, windows: torch.Tensor, run: Run, record: dict, fmt: Format,
    plans: dict[str, LayerPlan],
) -> None:
    started = time.perf_counter()
    state = WriterState(**run.body["writer"]) if "writer" in run.body else None
    writer = ShardWriter(settings.out, output_specs(staged, fmt, plans), settings.max_shard_bytes, state)
    try:
        non_block = staged.non_block_checkpoint_names()
        while writer.state.written < len(non_block):  # copied bit for bit, before the first block
            name = non_block[writer.state.written]
            writer.write(name, staged.checkpoint.read([name])[name])
        groups = list(staged.adapter.sequential_groups) if settings.true_sequential else [staged.adapter.linear_names]

        def process(context: BlockContext) -> dict[str, Any]:
            clock = time.perf_counter()
            results = compress_block(context, settings.method, groups, lambda name: settings.target)
            context.timing["compress"] = time.perf_counter() - clock
            clock = time.perf_counter()
            for name, tensor in encoded_block_state(staged, context.index, fmt, plans, results).items():
                writer.write(name, tensor)
            writer.sync()
            layers = {context.layer_name(linear): (result.weight == 0).float().mean().item()
                      for linear, result in results.items()}
            context.timing["write"] = time.perf_counter() - clock
            mean = sum(layers.values()) / max(len(layers), 1)
            log.info(
                "block %d/%d: read %.2fs, compress %.2fs, write %.2fs; sparsity %.2f%%",
                context.index + 1, staged.num_blocks, context.timing["read"], context.timing["compress"],
                context.timing["write"], 100 * mean,
            )
            return {"writer": asdict(writer.state), "layers": layers}

        stream_blocks(staged, windows, settings.stream, process, run, desc="compress")
        config = output_config(staged, fmt, plans, {**record, "layer_sparsity": run.body["layers"]})
        atomic_write(settings.out / "config.json", json.dumps(config, indent=2).encode())
        copy_side_files(settings.model, settings.out)
        writer.write_index()
    finally:
        writer.close()
    run.finish({"seconds": time.perf_counter() - started, "bytes_written": writer.bytes_written,
                "bytes_read": staged.checkpoint.bytes_read})
    if settings.stream.offload_dir is not None:
        for i in (0, 1):
            (settings.stream.offload_dir / f"activations-{i}.bin").unlink(missing_ok=True)
    log.info("wrote %s (%d shards)", settings.out, len(writer.shards))
