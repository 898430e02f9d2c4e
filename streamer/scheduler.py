"""The compress loop, the only place that knows the order of the phases.

    embed calibration windows ─► for each block: read ─► observe ─► compress ─► propagate ─► write ─► journal

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
from tqdm import tqdm

from methods import Method, Target
from methods.base import Statistic

from .activations import Activations
from .checkpoint import Checkpoint
from .data import calibration_windows, capped_seqlen, load_text, load_tokenizer, tokenize, windows_fingerprint
from .errors import LayerpressError
from .files import atomic_write
from .journal import Run
from .model import StagedModel
from .writer import ShardWriter, TensorSpec, copy_side_files

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
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None
    true_sequential: bool = False
    micro_batch: int = 1
    max_shard_bytes: int = 5 * 10**9
    offload_dir: Path | None = None
    restart: bool = False

    def record(self, seqlen: int, dtype: torch.dtype) -> dict[str, Any]:
        """Everything that changes the output: kept in the journal (resume must match) and in config.json."""
        return {
            "method": self.method.name,
            "method_settings": self.method.settings(),
            "sparsity": self.target.sparsity,
            "pattern": f"{self.target.pattern[0]}:{self.target.pattern[1]}" if self.target.pattern else None,
            "calibration": {"source": str(self.calib), "nsamples": self.nsamples, "seqlen": seqlen, "seed": self.seed},
            "dtype": str(dtype).removeprefix("torch."),
            "device": self.device.type,
            "true_sequential": self.true_sequential,
            "micro_batch": self.micro_batch,
            "max_shard_bytes": self.max_shard_bytes,
        }


def observe(
    linears: dict[str, nn.Linear], statistics: dict[str, Statistic], run_block: Callable[[], None]
) -> None:
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
    method: Method,
    linears: dict[str, nn.Linear],
    groups: list[tuple[str, ...]],
    target_for: Callable[[str], Target],
    run_block: Callable[[], None],
    describe: Callable[[str], str],
) -> dict[str, float]:
    """Compress every linear layer of one block in place; returns the achieved sparsity per layer."""
    sparsity = {}
    for group in groups:
        statistics = {name: method.statistic(linears[name]) for name in group}
        active = {name: stat for name, stat in statistics.items() if stat is not None}
        if active:
            observe(linears, active, run_block)
        for name in group:
            layer = linears[name]
            try:
                result = method.compress(layer, statistics[name], target_for(name))
            except ValueError as exc:
                raise LayerpressError(f"{method.name} failed on {describe(name)}: {exc}") from exc
            if not torch.isfinite(result.weight).all():
                raise LayerpressError(f"{method.name} produced non-finite weights for {describe(name)}")
            layer.weight.data.copy_(result.weight)
            sparsity[describe(name)] = (result.weight == 0).float().mean().item()
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
    checkpoint = Checkpoint(settings.model)
    staged = StagedModel(checkpoint, settings.device, settings.dtype)
    if settings.out.resolve() == settings.model.resolve():
        raise LayerpressError("the output directory must differ from the model directory")
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
            return settings.out
        _compress_blocks(settings, staged, windows, run, record)
    finally:
        run.close()
    return settings.out


def _compress_blocks(
    settings: CompressSettings, staged: StagedModel, windows: torch.Tensor, run: Run, record: dict
) -> None:
    checkpoint, adapter, device = staged.checkpoint, staged.adapter, settings.device
    started = time.perf_counter()
    writer = ShardWriter(settings.out, output_specs(staged), settings.max_shard_bytes, run.writer_state)
    resumed_at = run.blocks_done
    if resumed_at:
        log.info("resuming %s at block %d of %d", settings.out, resumed_at, staged.num_blocks)
    while writer.expected is not None and writer.state.written < len(staged.non_block_checkpoint_names()):
        name = writer.expected.name
        writer.write(name, checkpoint.read([name])[name])

    hidden_size = staged.config.hidden_size
    acts = Activations(
        len(windows), windows.shape[1], hidden_size, staged.dtype, settings.micro_batch, settings.offload_dir
    )
    with staged.pre_stage() as embedder:
        extras = {size: embedder.extras(size, windows.shape[1]) for size in acts.batch_sizes()}
        if run.inputs_file is None:
            for batch in acts.batches():
                acts.inputs.data[batch] = embedder.embed(windows[batch]).cpu()
        else:
            acts.inputs.load(run.inputs_file)

    groups = list(adapter.sequential_groups) if settings.true_sequential else [adapter.linear_names]
    bar = tqdm(total=staged.num_blocks, initial=resumed_at, desc="compress", unit="block", disable=None)
    for index in range(resumed_at, staged.num_blocks):
        clock = time.perf_counter()
        block = staged.load_block(index)
        timing = {"read": time.perf_counter() - clock}
        clock = time.perf_counter()

        def run_block(keep_outputs: bool = False) -> None:
            acts.run(
                lambda hidden: staged.call_block(block, hidden, extras[hidden.shape[0]]),
                device,
                keep_outputs=keep_outputs,
            )

        bar.set_postfix_str(f"block {index}: compress")
        layers = compress_block(
            settings.method,
            staged.linears(block),
            groups,
            lambda name: settings.target,
            run_block,
            lambda name: f"{adapter.blocks}.{index}.{name}",
        )
        bar.set_postfix_str(f"block {index}: propagate")
        run_block(keep_outputs=True)
        timing["compute"] = time.perf_counter() - clock

        clock = time.perf_counter()
        for name, tensor in staged.block_state(index).items():
            writer.write(name, tensor)
        writer.sync()
        staged.release_block(index)
        acts.swap()
        inputs_file = _persist_inputs(acts, run, index + 1)
        timing["write"] = time.perf_counter() - clock
        run.record_block(index, writer.state, inputs_file, layers, timing)
        mean = sum(layers.values()) / max(len(layers), 1)
        log.info(
            "block %d/%d: read %.2fs, compute %.2fs, write %.2fs; sparsity %.2f%%",
            index + 1, staged.num_blocks, timing["read"], timing["compute"], timing["write"], 100 * mean,
        )
        bar.update(1)
    bar.close()

    _finish(settings, staged, writer, run, record, time.perf_counter() - started)


def _persist_inputs(acts: Activations, run: Run, block: int) -> Path:
    """Make the next block's inputs durable: flush the offload file, or save the RAM buffer under .layerpress/."""
    if acts.inputs.path is not None:
        acts.inputs.flush()
        return acts.inputs.path
    path = run.persisted_inputs_path(block)
    acts.inputs.save(path)
    return path


def _finish(
    settings: CompressSettings, staged: StagedModel, writer: ShardWriter, run: Run, record: dict, seconds: float
) -> None:
    layers = run.body["layers"]
    config = dict(staged.checkpoint.config)
    config["layerpress"] = {**record, "layer_sparsity": layers}
    atomic_write(settings.out / "config.json", json.dumps(config, indent=2).encode())
    copy_side_files(settings.model, settings.out, skip=set())
    writer.write_index()
    run.finish(writer.state, {"seconds": seconds, "bytes_written": writer.bytes_written})
    if settings.offload_dir is not None:
        for i in (0, 1):
            (settings.offload_dir / f"activations-{i}.bin").unlink(missing_ok=True)
    log.info("wrote %s (%d shards)", settings.out, len(writer.shards))
