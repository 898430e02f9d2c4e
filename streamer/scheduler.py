"""`compress`: the order of the phases for one block, on top of the shared block loop (streamer/stream.py).

    embed calibration windows ─► for each block: read ─► observe ─► compress ─► [reconstruct]
                                                  ─► write ─► propagate ─► journal

Observe runs the calibration inputs through the block with hooks that feed each linear layer's inputs to the
method's statistics; compress replaces each layer's weight with the method's result; propagate runs the compressed
block to make the next block's inputs. With --true-sequential, observe and compress run once per group of layers
(q/k/v, then the output projection, ...), so each group sees inputs that already went through compressed groups.
With --reconstruct, the first observation also keeps the dense block's outputs (in the outputs buffer, which
propagation fills only later); after compression a few parameters are trained towards them and merged
(methods/reconstruct.py), so the next block's inputs come from the block as written.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from methods import Method, Target
from methods.base import Statistic
from methods.reconstruct import Reconstruction, ReconstructionReport, reconstruct

from .activations import Activations
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
    reconstruction: Reconstruction = field(default_factory=Reconstruction)

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
            "reconstruction": self.reconstruction.settings() if self.reconstruction.enabled else None,
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
    keep_dense_outputs: bool = False,
) -> dict[str, float]:
    """Compress every linear layer of the block in place, group by group; returns the sparsity per layer.

    keep_dense_outputs: leave the dense block's outputs in acts.outputs (the first observation, which runs before
    anything is compressed, stores them; a method that observes nothing gets one forward pass for them).
    """
    linears = context.linears
    sparsity = {}
    for position, group in enumerate(groups):
        statistics = {name: method.statistic(linears[name]) for name in group}
        active = {name: stat for name, stat in statistics.items() if stat is not None}
        keep_outputs = keep_dense_outputs and position == 0
        if active:
            observe(linears, active, lambda: context.forward(keep_outputs=keep_outputs))
        elif keep_outputs:
            context.forward(keep_outputs=True)
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


class TargetBatches(Sequence):
    """The calibration micro-batches on the device, each with the dense block's outputs for it (the targets)."""

    def __init__(self, acts: Activations, device: torch.device):
        self.acts, self.device, self.slices = acts, device, acts.batches()

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.slices[index]
        return self.acts.inputs.data[batch].to(self.device), self.acts.outputs.data[batch].to(self.device)


def block_seed(seed: int, index: int) -> int:
    """The seed of everything random in block `index`'s reconstruction: a resumed run draws the same numbers."""
    return (seed << 32) + index


def reconstruct_block(context: BlockContext, settings: Reconstruction, seed: int) -> ReconstructionReport:
    """Train the block (already compressed; its dense outputs in acts.outputs) towards those outputs, then merge."""
    clock = time.perf_counter()
    generator = torch.Generator().manual_seed(block_seed(seed, context.index))
    batches = TargetBatches(context.acts, context.device)
    try:
        report = reconstruct(context.block, context.linears, context.norms, context.call, batches, settings, generator)
    except ValueError as exc:
        raise LayerpressError(f"reconstruction of block {context.index} failed: {exc}") from exc
    context.timing["reconstruct"] = time.perf_counter() - clock
    log.info(
        "block %d: reconstructed %s in %.2fs: output MSE %.4g -> %.4g, %d parameters trained (%.3f%% of the block's)",
        context.index + 1, ",".join(settings.subsets), context.timing["reconstruct"], report.loss_before,
        report.loss_after, report.trained, 100 * report.trained / report.total,
    )
    return report


def output_specs(staged: StagedModel) -> list[TensorSpec]:
    """The output tensors in write order: everything outside the blocks first, then block by block."""
    names = staged.non_block_checkpoint_names()
    for index in range(staged.num_blocks):
        names += staged.block_checkpoint_names(index)
    return [TensorSpec(name, *staged.tensor_spec(name)) for name in names]


def reconstruction_summary(blocks: dict[str, dict], model_parameters: int) -> dict[str, Any]:
    """Totals over the blocks' reconstruction reports, for config.json."""
    trained = sum(block["trained"] for block in blocks.values())
    return {
        "trained_parameters": trained,
        "fraction_of_block_parameters": trained / max(sum(block["total"] for block in blocks.values()), 1),
        "fraction_of_model_parameters": trained / max(model_parameters, 1),
    }


def compress(settings: CompressSettings) -> Path:
    """Compress a checkpoint block by block into `settings.out`; resumes a partial run of the same settings."""
    if settings.out.resolve() == settings.model.resolve():
        raise LayerpressError("the output directory must differ from the model directory")
    checkpoint = Checkpoint(settings.model)
    staged = StagedModel(
        checkpoint, settings.stream.device, settings.dtype, add_biases="biases" in settings.reconstruction.subsets
    )
    if "biases" in settings.reconstruction.subsets and all(
        layer.bias is None for layer in staged.linears(staged.blocks[0]).values()
    ):
        raise LayerpressError(f"--reconstruct biases: this {checkpoint.config.get('model_type')} model has no biases "
                              "and no config flag that gives its linear layers some")
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
        else:
            _compress(settings, staged, windows, run, record)
    finally:
        run.close()
    return settings.out


def _compress(settings: CompressSettings, staged: StagedModel, windows: torch.Tensor, run: Run, record: dict) -> None:
    started = time.perf_counter()
    state = WriterState(**run.body["writer"]) if "writer" in run.body else None
    specs = output_specs(staged)
    writer = ShardWriter(settings.out, specs, settings.max_shard_bytes, state)
    try:
        non_block = staged.non_block_checkpoint_names()
        while writer.state.written < len(non_block):  # copied bit for bit, before the first block
            name = non_block[writer.state.written]
            writer.write(name, staged.checkpoint.read([name])[name])
        groups = list(staged.adapter.sequential_groups) if settings.true_sequential else [staged.adapter.linear_names]
        reconstruction = settings.reconstruction

        def process(context: BlockContext) -> dict[str, Any]:
            journal: dict[str, Any] = {}
            clock = time.perf_counter()
            layers = compress_block(  # with reconstruction: the dense outputs, its targets, kept in acts.outputs
                context, settings.method, groups, lambda name: settings.target, reconstruction.enabled
            )
            context.timing["compress"] = time.perf_counter() - clock
            if reconstruction.enabled:
                report = reconstruct_block(context, reconstruction, settings.seed)
                journal["reconstruction"] = {str(context.index): asdict(report)}
                layers = {context.layer_name(name): (layer.weight == 0).float().mean().item()
                          for name, layer in context.linears.items()}  # as written (plain lora fills zeros in)
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
            return {"writer": asdict(writer.state), "layers": layers, **journal}

        stream_blocks(staged, windows, settings.stream, process, run, desc="compress")
        config = {**staged.checkpoint.config, **staged.config_changes}
        config["layerpress"] = {**record, "layer_sparsity": run.body["layers"]}
        if reconstruction.enabled:
            config["layerpress"]["reconstruction_summary"] = reconstruction_summary(
                run.body["reconstruction"], sum(math.prod(spec.shape) for spec in specs)
            )
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
