"""`compress`: the order of the phases for one block, on top of the shared block loop (streamer/stream.py).

    embed calibration windows ─► for each block: read ─► observe ─► compress ─► write ─► propagate ─► journal

Observe runs the calibration inputs through the block with hooks that feed each linear layer's inputs to the
method's statistics; compress replaces each layer's weight with the method's result; propagate runs the compressed
block to make the next block's inputs. With --true-sequential, observe and compress run once per group of layers
(q/k/v, then the output projection, ...), so each group sees inputs that already went through compressed groups.
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

from methods import Method, Target
from methods.base import Statistic

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
from .allocation import Allocation
from .errors import LayerpressError
from .files import atomic_write
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
    allocation: Allocation = field(default_factory=Allocation)

    def __post_init__(self) -> None:
        if self.target.pattern is not None and self.allocation.kind != "uniform":
            raise LayerpressError("an N:M pattern fixes every layer's sparsity: use --allocation uniform with --pattern")

    def record(self, seqlen: int, dtype: torch.dtype) -> dict[str, Any]:
        """Everything that changes the output: kept in the journal (resume must match) and in config.json."""
        return {
            "method": self.method.name,
            "method_settings": self.method.settings(),
            "sparsity": self.target.sparsity,
            "pattern": f"{self.target.pattern[0]}:{self.target.pattern[1]}" if self.target.pattern else None,
            "calibration": calibration_record(self.calib, self.nsamples, seqlen, self.seed),
            "dtype": str(dtype).removeprefix("torch."),
            "device": self.stream.device.type,
            "true_sequential": self.true_sequential,
            "micro_batch": self.stream.micro_batch,
            "max_shard_bytes": self.max_shard_bytes,
            # uniform leaves the record as it was before allocations existed, so older partial runs still resume
            **({} if self.allocation.kind == "uniform" else {"allocation": self.allocation.record(self.target.sparsity)}),
        }


def calibration_record(calib: str, nsamples: int, seqlen: int, seed: int) -> dict[str, Any]:
    return {"source": describe_source(calib), "nsamples": nsamples, "seqlen": seqlen, "seed": seed}


@dataclass
class Calibrated:
    """A checkpoint opened for a calibrated streaming pass: its staged model and the calibration windows."""

    staged: StagedModel
    windows: torch.Tensor
    fingerprints: dict[str, str]

    @property
    def seqlen(self) -> int:
        return self.windows.shape[1]


def open_calibrated(
    model: Path, calib: str, nsamples: int, seqlen: int, seed: int, device: torch.device, dtype: torch.dtype | None
) -> Calibrated:
    """Read the checkpoint's headers, build its staged model and cut the calibration windows (seqlen capped)."""
    checkpoint = Checkpoint(model)
    staged = StagedModel(checkpoint, device, dtype)
    windows = calibration_windows(
        tokenize(load_tokenizer(model), load_text(calib)), nsamples, capped_seqlen(seqlen, checkpoint.config), seed
    )
    return Calibrated(staged, windows, {"checkpoint": checkpoint.fingerprint(), "calibration": windows_fingerprint(windows)})


def remove_offloaded_activations(options: StreamOptions) -> None:
    """A finished pass no longer needs its --offload-activations files."""
    if options.offload_dir is not None:
        for i in (0, 1):
            (options.offload_dir / f"activations-{i}.bin").unlink(missing_ok=True)


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


def output_specs(staged: StagedModel) -> list[TensorSpec]:
    """The output tensors in write order: everything outside the blocks first, then block by block."""
    entries = staged.checkpoint.entries
    names = staged.non_block_checkpoint_names()
    for index in range(staged.num_blocks):
        names += staged.block_checkpoint_names(index)
    return [TensorSpec(name, entries[name].dtype, entries[name].shape) for name in names]


def compress(settings: CompressSettings) -> Path:
    """Compress a checkpoint block by block into `settings.out`; resumes a partial run of the same settings."""
    if settings.out.resolve() == settings.model.resolve():
        raise LayerpressError("the output directory must differ from the model directory")
    calibrated = open_calibrated(
        settings.model, settings.calib, settings.nsamples, settings.seqlen, settings.seed, settings.stream.device,
        settings.dtype,
    )
    staged = calibrated.staged
    record = settings.record(calibrated.seqlen, staged.dtype)
    layer_targets = None
    if settings.allocation.kind != "uniform":
        layer_targets = settings.allocation.layer_sparsities(staged.linear_layers(), settings.target.sparsity)
        record["layer_targets"] = layer_targets
        log.info("allocation %s: layer sparsities from %.4f to %.4f", settings.allocation.kind,
                 min(layer_targets.values()), max(layer_targets.values()))
    run = Run(settings.out, "compress", record, calibrated.fingerprints, staged.num_blocks, restart=settings.restart)
    try:
        if run.complete:
            log.info("%s is already complete; nothing to do (use --restart to redo it)", settings.out)
        else:

            def target_for(name: str) -> Target:
                return settings.target if layer_targets is None else Target(sparsity=layer_targets[name])

            _compress(settings, staged, calibrated.windows, run, record, target_for)
    finally:
        run.close()
    return settings.out


def _compress(
    settings: CompressSettings, staged: StagedModel, windows: torch.Tensor, run: Run, record: dict,
    target_for: Callable[[str], Target],
) -> None:
    started = time.perf_counter()
    state = WriterState(**run.body["writer"]) if "writer" in run.body else None
    writer = ShardWriter(settings.out, output_specs(staged), settings.max_shard_bytes, state)
    try:
        non_block = staged.non_block_checkpoint_names()
        while writer.state.written < len(non_block):  # copied bit for bit, before the first block
            name = non_block[writer.state.written]
            writer.write(name, staged.checkpoint.read([name])[name])
        groups = list(staged.adapter.sequential_groups) if settings.true_sequential else [staged.adapter.linear_names]

        def process(context: BlockContext) -> dict[str, Any]:
            clock = time.perf_counter()
            layers = compress_block(context, settings.method, groups, target_for)
            context.timing["compress"] = time.perf_counter() - clock
            clock = time.perf_counter()
            for name, tensor in staged.block_state(context.index).items():
                writer.write(name, tensor)
            writer.sync()
            context.timing["write"] = time.perf_counter() - clock
            mean = sum(layers.values()) / max(len(layers), 1)
            log.info(
                "block %d/%d: read %.2fs, compress %.2fs, write %.2fs; sparsity %.2f%%",
                context.index + 1, staged.num_blocks, context.timing["read"], context.timing["compress"],
                context.timing["write"], 100 * mean,
            )
            return {"writer": asdict(writer.state), "layers": layers}

        stream_blocks(staged, windows, settings.stream, process, run, desc="compress")
        config = dict(staged.checkpoint.config)
        config["layerpress"] = {**record, "layer_sparsity": run.body["layers"]}
        atomic_write(settings.out / "config.json", json.dumps(config, indent=2).encode())
        copy_side_files(settings.model, settings.out)
        writer.write_index()
    finally:
        writer.close()
    run.finish({"seconds": time.perf_counter() - started, "bytes_written": writer.bytes_written,
                "bytes_read": staged.checkpoint.bytes_read})
    remove_offloaded_activations(settings.stream)
    log.info("wrote %s (%d shards)", settings.out, len(writer.shards))
