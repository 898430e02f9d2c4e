"""`compress`: the order of the phases for one block, on top of the shared block loop (streamer/stream.py).

    embed calibration windows ─► for each block: read ─► observe ─► compress ─► write ─► propagate ─► journal

Observe runs the calibration inputs through the block with hooks that feed each linear layer's inputs to the
method's statistics; compress replaces each layer's weight with the method's result; propagate runs the compressed
block to make the next block's inputs. With --true-sequential, observe and compress run once per group of layers
(q/k/v, then the output projection, ...), so each group sees inputs that already went through compressed groups.

A structured method (FLAP) decides for the whole model at once, so it runs in passes instead (streamer/structured.py):

    statistics pass (streamed) ─► search ─► pruning pass: for each block: read ─► cut to kept units ─► write ─► journal
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from methods import Method, StructuredMethod, Target

from .checkpoint import Checkpoint
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
from .journal import Run
from .model import StagedModel
from . import structured
from .stream import BlockContext, StreamOptions, observe, stream_blocks, walk_blocks
from .structure import STRUCTURE_KEY
from .writer import ShardWriter, TensorSpec, WriterState, copy_side_files

log = logging.getLogger("layerpress")


@dataclass
class CompressSettings:
    model: Path
    out: Path
    method: Method | StructuredMethod
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

    def record(self, seqlen: int, dtype: torch.dtype) -> dict[str, Any]:
        """Everything that changes the output: kept in the journal (resume must match) and in config.json."""
        return {
            "method": self.method.name,
            "method_settings": self.method.settings(),
            "sparsity": self.target.sparsity,
            "pattern": f"{self.target.pattern[0]}:{self.target.pattern[1]}" if self.target.pattern else None,
            "calibration": {"source": describe_source(self.calib), "nsamples": self.nsamples, "seqlen": seqlen, "seed": self.seed},
            "dtype": str(dtype).removeprefix("torch."),
            "device": self.stream.device.type,
            "true_sequential": self.true_sequential,
            "micro_batch": self.stream.micro_batch,
            "max_shard_bytes": self.max_shard_bytes,
        }


def compress_block(
    context: BlockContext, method: Method, groups: list[tuple[str, ...]], target_for: Callable[[str], Target]
) -> dict[str, float]:
    """Compress every linear layer of the block in place, group by group; returns the sparsity per layer."""
    linears = context.linears
    sparsity = {}
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
            sparsity[full_name] = (result.weight == 0).float().mean().item()
    return sparsity


def output_specs(
    staged: StagedModel, block_specs: Callable[[int], list[TensorSpec]] | None = None
) -> list[TensorSpec]:
    """The output tensors in write order: everything outside the blocks first, then block by block.

    block_specs: the tensors of a block when they differ from the checkpoint's (structured pruning)."""
    entries = staged.checkpoint.entries
    specs = [TensorSpec(name, entries[name].dtype, entries[name].shape) for name in staged.non_block_checkpoint_names()]
    for index in range(staged.num_blocks):
        if block_specs is not None:
            specs += block_specs(index)
        else:
            names = staged.block_checkpoint_names(index)
            specs += [TensorSpec(name, entries[name].dtype, entries[name].shape) for name in names]
    return specs


def compress(settings: CompressSettings) -> Path:
    """Compress a checkpoint block by block into `settings.out`; resumes a partial run of the same settings."""
    if settings.out.resolve() == settings.model.resolve():
        raise LayerpressError("the output directory must differ from the model directory")
    checkpoint = Checkpoint(settings.model)
    staged = StagedModel(checkpoint, settings.stream.device, settings.dtype)
    seqlen = capped_seqlen(settings.seqlen, checkpoint.config)
    tokenizer = load_tokenizer(settings.model)
    windows = calibration_windows(
        tokenize(tokenizer, load_text(settings.calib)), settings.nsamples, seqlen, settings.seed
    )
    record = settings.record(seqlen, staged.dtype)
    fingerprints = {"checkpoint": checkpoint.fingerprint(), "calibration": windows_fingerprint(windows)}
    run = Run(settings.out, "compress", record, fingerprints, staged.num_blocks, restart=settings.restart)
    try:
        if run.complete:
            log.info("%s is already complete; nothing to do (use --restart to redo it)", settings.out)
        elif isinstance(settings.method, StructuredMethod):
            _compress_structured(settings, staged, windows, run, record)
        else:
            _compress(settings, staged, windows, run, record)
    finally:
        run.close()
    return settings.out


@contextmanager
def _output(settings: CompressSettings, staged: StagedModel, run: Run, specs: list[TensorSpec]) -> Iterator[ShardWriter]:
    """The output's shard writer, resumed from the journal, with everything outside the blocks already copied."""
    state = WriterState(**run.body["writer"]) if "writer" in run.body else None
    writer = ShardWriter(settings.out, specs, settings.max_shard_bytes, state)
    try:
        non_block = staged.non_block_checkpoint_names()
        while writer.state.written < len(non_block):  # copied bit for bit, before the first block
            name = non_block[writer.state.written]
            writer.write(name, staged.checkpoint.read([name])[name])
        yield writer
    finally:
        writer.close()


def _write_block(writer: ShardWriter, tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Append one block's tensors and make them durable; returns what the journal keeps of the writer."""
    for name, tensor in tensors:
        writer.write(name, tensor)
    writer.sync()
    return {"writer": asdict(writer.state)}


def _finish(settings: CompressSettings, staged: StagedModel, run: Run, writer: ShardWriter, config: dict,
            started: float) -> None:
    """Config, side files and index (the index last: only now does the output load), then close the journal."""
    atomic_write(settings.out / "config.json", json.dumps(config, indent=2).encode())
    copy_side_files(settings.model, settings.out)
    writer.write_index()
    run.finish({"seconds": time.perf_counter() - started, "bytes_written": writer.bytes_written,
                "bytes_read": staged.checkpoint.bytes_read})
    if settings.stream.offload_dir is not None:
        for i in (0, 1):
            (settings.stream.offload_dir / f"activations-{i}.bin").unlink(missing_ok=True)
    log.info("wrote %s (%d shards)", settings.out, len(writer.shards))


def _compress(settings: CompressSettings, staged: StagedModel, windows: torch.Tensor, run: Run, record: dict) -> None:
    started = time.perf_counter()
    groups = list(staged.adapter.sequential_groups) if settings.true_sequential else [staged.adapter.linear_names]
    with _output(settings, staged, run, output_specs(staged)) as writer:

        def process(context: BlockContext) -> dict[str, Any]:
            clock = time.perf_counter()
            layers = compress_block(context, settings.method, groups, lambda name: settings.target)
            context.timing["compress"] = time.perf_counter() - clock
            clock = time.perf_counter()
            journal = _write_block(writer, staged.block_state(context.index).items())
            context.timing["write"] = time.perf_counter() - clock
            mean = sum(layers.values()) / max(len(layers), 1)
            log.info(
                "block %d/%d: read %.2fs, compress %.2fs, write %.2fs; sparsity %.2f%%",
                context.index + 1, staged.num_blocks, context.timing["read"], context.timing["compress"],
                context.timing["write"], 100 * mean,
            )
            return {**journal, "layers": layers}

        stream_blocks(staged, windows, settings.stream, process, run, desc="compress")
        config = dict(staged.checkpoint.config)
        config["layerpress"] = {**record, "layer_sparsity": run.body["layers"]}
        _finish(settings, staged, run, writer, config, started)


def _compress_structured(
    settings: CompressSettings, staged: StagedModel, windows: torch.Tensor, run: Run, record: dict
) -> None:
    """Statistics pass, global search, pruning pass (streamer/structured.py) into physically smaller shards."""
    started = time.perf_counter()
    method = settings.method
    summaries = structured.collect_summaries(method, staged, windows, settings.stream, run)
    plan = structured.plan_units(method, staged, summaries, run)
    layout = structured.pruned_layout(method, staged, plan)
    with _output(settings, staged, run, output_specs(staged, layout.specs)) as writer:

        def process(index: int, block: nn.Module) -> dict[str, Any]:
            tensors = structured.prune_block(method, staged, summaries, plan, index, block)
            kept = {f"{staged.block_prefix(index)}{name}": int(plan.keep[name][index].sum()) for name in plan.keep}
            log.info("prune: block %d/%d: units kept %s", index + 1, staged.num_blocks,
                     ", ".join(f"{name} {count}/{staged.layouts[name].units_in(block)}"
                               for name, count in zip(plan.keep, kept.values())))
            return {**_write_block(writer, layout.block_tensors(index, tensors)), "layers": kept}

        walk_blocks(staged, process, run, desc="prune")
        config = dict(staged.checkpoint.config)
        config[STRUCTURE_KEY] = layout.structure
        config["layerpress"] = {**record, "kept_units": run.body["layers"], "parameters": plan.parameters}
        _finish(settings, staged, run, writer, config, started)
