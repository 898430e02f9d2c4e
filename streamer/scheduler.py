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
from .data import Calibration, CalibrationOptions
from .errors import LayerpressError
from .files import atomic_write
from .gradients import GradientNorms
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
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    dtype: torch.dtype | None = None
    true_sequential: bool = False
    max_shard_bytes: int = 5 * 10**9
    restart: bool = False
    stream: StreamOptions = field(default_factory=StreamOptions)
    gradients: Path | None = None  # a `main.py gradients` directory, for methods that use gradient norms

    def record(self, calibration: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """Everything that changes the output: kept in the journal (resume must match) and in config.json."""
        return {
            "method": self.method.name,
            "method_settings": self.method.settings(),
            "sparsity": self.target.sparsity,
            "pattern": f"{self.target.pattern[0]}:{self.target.pattern[1]}" if self.target.pattern else None,
            "calibration": calibration,
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
    context: BlockContext,
    method: Method,
    groups: list[tuple[str, ...]],
    target_for: Callable[[str], Target],
    precomputed: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Compress every linear layer of the block in place, group by group; returns the sparsity per layer.

    precomputed: by layer name, the tensors the method's `statistic` takes besides the layer (see Method.precomputed).
    """
    linears = context.linears
    precomputed = precomputed or {}
    sparsity = {}
    for group in groups:
        statistics = {name: method.statistic(linears[name], **precomputed.get(name, {})) for name in group}
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
    checkpoint = Checkpoint(settings.model)
    staged = StagedModel(checkpoint, settings.stream.device, settings.dtype)
    calibration = settings.calibration.load(settings.model, checkpoint.config)
    record = settings.record(calibration.record, staged.dtype)
    fingerprints = {"checkpoint": checkpoint.fingerprint(), "calibration": calibration.fingerprint}
    gradients = gradient_norms(settings, checkpoint, calibration)
    if gradients is not None:
        fingerprints["gradients"] = gradients.fingerprint
    run = Run(settings.out, "compress", record, fingerprints, staged.num_blocks, restart=settings.restart)
    try:
        if run.complete:
            log.info("%s is already complete; nothing to do (use --restart to redo it)", settings.out)
        else:
            _compress(settings, staged, calibration.windows, run, record, gradients)
    finally:
        run.close()
    return settings.out


def gradient_norms(
    settings: CompressSettings, checkpoint: Checkpoint, calibration: Calibration
) -> GradientNorms | None:
    """The gradient norms of --gradients when the method takes them, checked against this model and calibration."""
    method = settings.method
    unknown = set(method.precomputed) - {"gradient_norms"}
    if unknown:
        raise LayerpressError(f"{method.name} needs precomputed {sorted(unknown)}, which no layerpress pass makes")
    if "gradient_norms" not in method.precomputed:
        if settings.gradients is not None:
            raise LayerpressError(f"--gradients is for methods that use gradient norms (gblm), not {method.name}")
        return None
    if settings.gradients is None:
        raise LayerpressError(
            f"{method.name} needs gradient norms: make them with `main.py gradients --model IN --out GRAD_DIR` "
            "(same calibration options) and pass --gradients GRAD_DIR"
        )
    return GradientNorms(settings.gradients, checkpoint, calibration)


def _compress(
    settings: CompressSettings,
    staged: StagedModel,
    windows: torch.Tensor,
    run: Run,
    record: dict,
    gradients: GradientNorms | None,
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
            precomputed = (
                {name: {"gradient_norms": norms} for name, norms in gradients.for_block(context).items()}
                if gradients is not None
                else {}
            )
            layers = compress_block(context, settings.method, groups, lambda name: settings.target, precomputed)
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
    if settings.stream.offload_dir is not None:
        for i in (0, 1):
            (settings.stream.offload_dir / f"activations-{i}.bin").unlink(missing_ok=True)
    log.info("wrote %s (%d shards)", settings.out, len(writer.shards))
