"""`compress`: the order of the phases for one block, on top of the shared block loop (streamer/stream.py).

    embed calibration windows ─► for each block: read ─► observe ─► compress ─► [reconstruct]
                                                  ─► write ─► propagate ─► journal

Observe runs the calibration inputs through the block with hooks that feed each linear layer's inputs to the
method's statistics; compress replaces each layer's weight with the method's result; propagate runs the compressed
block to make the next block's inputs. With --true-sequential, observe and compress run once per group of layers
(q/k/v, then the output projection, ...), so each group sees inputs that already went through compressed groups.
An observation stops each micro-batch's forward as soon as its layers have their inputs.

Settings the user leaves open come from the memory plan (streamer/planner.py): the micro-batch, where the activation
buffers live, and whether a group's statistics are observed together or, when they do not fit, one layer at a time
(same inputs, same statistics, so the same output).
Write hands each compressed layer to the output format (streamer/formats.py), planned before the first block.
With --reconstruct, the first observation also keeps the dense block's outputs (in the outputs buffer, which
propagation fills only later); after compression a few parameters are trained towards them and merged
(methods/reconstruct.py), so the next block's inputs come from the block as written.

A structured method (FLAP) decides for the whole model at once, so it runs in passes instead (streamer/structured.py):

    statistics pass (streamed) ─► search ─► pruning pass: for each block: read ─► cut to kept units ─► write ─► journal
"""

from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import psutil
import torch
from torch import nn

from methods import LayerResult, Method, StructuredMethod, Target
from methods.base import Statistic
from methods.reconstruct import Reconstruction, ReconstructionReport, reconstruct

from .activations import Activations
from .allocation import Allocation, BitsPolicy
from .checkpoint import Checkpoint
from .data import Calibration, CalibrationOptions
from .decompress import open_checkpoint
from .errors import LayerpressError
from .files import atomic_write
from .formats import FORMATS, Format, LayerPlan, compressed_tensors_config
from .gradients import GradientNorms
from .journal import WORK_DIR, Run, read_journal
from .model import StagedModel
from . import structured
from .planner import Budget, ModelShapes, Plan, Planner, Workload
from .stream import BlockContext, StreamOptions, forward_until_observed, observe, stream_blocks, walk_blocks
from .structure import STRUCTURE_KEY
from .writer import ShardWriter, TensorSpec, WriterState, copy_side_files

log = logging.getLogger("layerpress")


@dataclass
class CompressSettings:
    model: Path
    out: Path
    method: Method | StructuredMethod
    target: Target
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    dtype: torch.dtype | None = None
    true_sequential: bool = False
    max_shard_bytes: int = 5 * 10**9
    restart: bool = False
    stream: StreamOptions = field(default_factory=StreamOptions)
    micro_batch: int | None = None  # None: the largest the plan fits (a resumed run keeps its own)
    statistics_per_layer: bool = False  # force it; otherwise the plan turns it on when a group's do not fit
    budget: Budget | None = None  # memory the plan may use; None: the machine's totals
    format: str = "dense"
    allocation: Allocation = field(default_factory=Allocation)
    bits: BitsPolicy = field(default_factory=BitsPolicy)  # per-layer bit widths (CPTQuant)
    reconstruction: Reconstruction = field(default_factory=Reconstruction)
    gradients: Path | None = None  # a `main.py gradients` directory, for methods that use gradient norms

    def __post_init__(self) -> None:
        if self.target.pattern is not None and self.allocation.kind != "uniform":
            raise LayerpressError("an N:M pattern fixes every layer's sparsity: use --allocation uniform with --pattern")

    def record(self, calibration: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """Everything that changes the output: kept in the journal (resume must match) and in config.json."""
        return {
            "method": self.method.name,
            "method_settings": self.method.settings(),
            "sparsity": self.target.sparsity,
            "pattern": f"{self.target.pattern[0]}:{self.target.pattern[1]}" if self.target.pattern else None,
            "quantization": self.quantization_record(),
            "format": self.format,
            "calibration": calibration,
            "dtype": str(dtype).removeprefix("torch."),
            "device": self.stream.device.type,
            "true_sequential": self.true_sequential,
            "micro_batch": self.stream.micro_batch,
            "max_shard_bytes": self.max_shard_bytes,
            # uniform leaves the record as it was before allocations existed, so older partial runs still resume
            **({} if self.allocation.kind == "uniform" else {"allocation": self.allocation.record(self.target.sparsity)}),
            **({"reconstruction": self.reconstruction.settings()} if self.reconstruction.enabled else {}),
        }

    def quantization_record(self) -> dict[str, Any] | None:
        """The grid of every layer; with a bits policy, bits null (each layer's are in `layer_bits`)."""
        if self.target.quant is None:
            return None
        return {**asdict(self.target.quant), **({"bits": None} if self.bits.enabled else {})}


@dataclass
class Calibrated:
    """A checkpoint opened for a calibrated streaming pass: its staged model, calibration windows and fingerprints."""

    staged: StagedModel
    calibration: Calibration
    fingerprints: dict[str, str]

    @property
    def windows(self) -> torch.Tensor:
        return self.calibration.windows

    @property
    def seqlen(self) -> int:
        return self.windows.shape[1]


def open_calibrated(
    model: Path, calibration: CalibrationOptions, device: torch.device, dtype: torch.dtype | None,
    add_biases: bool = False,
) -> Calibrated:
    """Read the checkpoint's headers, build its staged model and cut the calibration windows (seqlen capped).
    add_biases: give the blocks' linear layers biases (see StagedModel)."""
    checkpoint = open_checkpoint(model)
    staged = StagedModel(checkpoint, device, dtype, add_biases=add_biases)
    loaded = calibration.load(model, checkpoint.config)
    return Calibrated(staged, loaded, {"checkpoint": checkpoint.fingerprint(), "calibration": loaded.fingerprint})


def remove_offloaded_activations(options: StreamOptions) -> None:
    """A finished pass no longer needs its --offload-activations files."""
    if options.offload_dir is not None:
        for i in (0, 1):
            (options.offload_dir / f"activations-{i}.bin").unlink(missing_ok=True)


def compress_block(
    context: BlockContext,
    method: Method,
    groups: list[tuple[str, ...]],
    target_for: Callable[[str], Target],
    per_layer_statistics: bool = False,
    keep_dense_outputs: bool = False,
    precomputed: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, LayerResult]:
    """Compress every linear layer of the block in place, group by group; returns each layer's result, whose weight
    is the layer's own (installed, not a copy).

    per_layer_statistics: observe one layer of a group at a time (one statistic in memory instead of the group's).
    The layers are taken from the last to the first: a layer's inputs depend only on the layers before it, so each
    result goes in at once and every layer is still observed on the inputs it has when the group is observed at once.
    keep_dense_outputs: leave the dense block's outputs in acts.outputs (the first observation, which runs before
    anything is compressed, runs whole and stores them; a method that observes nothing gets one forward for them).
    precomputed: by layer name, the tensors the method's `statistic` takes besides the layer (see Method.precomputed).
    """
    linears = context.linears
    precomputed = precomputed or {}
    results = {}
    dense_outputs_pending = keep_dense_outputs

    def observe_inputs(statistics: dict[str, Statistic]) -> None:
        nonlocal dense_outputs_pending
        with context.phase("observe"):
            if dense_outputs_pending:
                observe(linears, statistics, lambda: context.forward(keep_outputs=True))
                dense_outputs_pending = False
            else:
                observe(linears, statistics, forward_until_observed(context), stop_early=True)

    def compress_layer(name: str, statistic: Statistic | None) -> None:
        nonlocal dense_outputs_pending
        if dense_outputs_pending:
            with context.phase("observe"):
                context.forward(keep_outputs=True)
            dense_outputs_pending = False
        with context.phase("compress"):
            results[name] = _compress_layer(context, method, name, statistic, target_for)

    for group in groups:
        if per_layer_statistics:
            for name in reversed(group):
                statistic = method.statistic(linears[name], **precomputed.get(name, {}))
                if statistic is not None:
                    observe_inputs({name: statistic})
                compress_layer(name, statistic)
                del statistic
        else:
            statistics = {name: method.statistic(linears[name], **precomputed.get(name, {})) for name in group}
            if any(stat is not None for stat in statistics.values()):
                observe_inputs({name: stat for name, stat in statistics.items() if stat is not None})
            for name in group:  # each statistic is dropped as soon as its layer is done
                compress_layer(name, statistics.pop(name))
    return {name: results[name] for group in groups for name in group}  # in layer order, however observed


def _compress_layer(
    context: BlockContext, method: Method, name: str, statistic: Statistic | None, target_for: Callable[[str], Target]
) -> LayerResult:
    """Compress one layer and install the result in it (the result then holds the layer's weight, not a copy)."""
    layer, full_name = context.linears[name], context.layer_name(name)
    try:
        result = method.compress(layer, statistic, target_for(full_name))
    except ValueError as exc:
        raise LayerpressError(f"{method.name} failed on {full_name}: {exc}") from exc
    if not torch.isfinite(result.weight).all():
        raise LayerpressError(f"{method.name} produced non-finite weights for {full_name}")
    layer.weight.data.copy_(result.weight)
    return replace(result, weight=layer.weight.data)


def zero_fraction(weight: torch.Tensor) -> float:
    return torch.count_nonzero(weight == 0).item() / weight.numel()


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
    generator = torch.Generator().manual_seed(block_seed(seed, context.index))
    batches = TargetBatches(context.acts, context.device)
    try:
        with context.phase("reconstruct"):
            report = reconstruct(context.block, context.linears, context.norms, context.call, batches, settings,
                                 generator)
    except ValueError as exc:
        raise LayerpressError(f"reconstruction of block {context.index} failed: {exc}") from exc
    log.info(
        "block %d: reconstructed %s in %.2fs: output MSE %.4g -> %.4g, %d parameters trained (%.3f%% of the block's)",
        context.index + 1, ",".join(settings.subsets), context.phase.seconds["reconstruct"], report.loss_before,
        report.loss_after, report.trained, 100 * report.trained / report.total,
    )
    return report


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


def compress(settings: CompressSettings) -> Path:
    """Compress a checkpoint block by block into `settings.out`; resumes a partial run of the same settings."""
    if settings.out.resolve() == settings.model.resolve():
        raise LayerpressError("the output directory must differ from the model directory")
    calibrated = open_calibrated(
        settings.model, settings.calibration, settings.stream.device, settings.dtype,
        add_biases="biases" in settings.reconstruction.subsets,
    )
    staged, windows = calibrated.staged, calibrated.windows
    if isinstance(settings.method, StructuredMethod):
        check_structured(settings)
        record = settings.record(calibrated.calibration.record, staged.dtype)

        def work(run: Run) -> None:
            _compress_structured(settings, staged, windows, run, record)
    else:
        if settings.bits.enabled and (settings.target.quant is None or not settings.method.quantizes):
            raise LayerpressError(f"--bits-policy chooses each layer's bit width: use a method that quantizes (gptq, "
                                  f"rtn, sparsegpt), not {settings.method.name}")
        try:
            settings.method.check(settings.target)
        except ValueError as exc:
            raise LayerpressError(str(exc)) from exc
        check_reconstruction(settings, staged)
        plan = apply_plan(settings, staged, calibrated.seqlen)
        record = settings.record(calibrated.calibration.record, staged.dtype)
        layer_targets = None
        if settings.allocation.kind != "uniform":
            layer_targets = settings.allocation.layer_sparsities(staged.linear_layers(), settings.target.sparsity)
            record["layer_targets"] = layer_targets
            log.info("allocation %s: layer sparsities from %.4f to %.4f", settings.allocation.kind,
                     min(layer_targets.values()), max(layer_targets.values()))

        layer_bits = None
        if settings.bits.enabled:
            layer_bits, record["bits_policy"] = settings.bits.layer_bits(staged.linear_layers())
            record["layer_bits"] = layer_bits
            log.info("bits policy %s: %d of %d layers at %d bits, average %.4f bits per weight", settings.bits.kind,
                     sum(bits == max(layer_bits.values()) for bits in layer_bits.values()), len(layer_bits),
                     max(layer_bits.values()), record["bits_policy"]["achieved_avg_bits"])

        def target_for(name: str) -> Target:
            target = settings.target
            if layer_targets is not None:
                target = replace(target, sparsity=layer_targets[name])
            if layer_bits is not None:
                target = replace(target, quant=replace(target.quant, bits=layer_bits[name]))
            return target

        fmt = FORMATS[settings.format]
        plans = layer_plans(staged, settings.method, target_for)
        check_plans(fmt, plans)

        gradients = gradient_norms(settings, staged.checkpoint, calibrated.calibration)
        if gradients is not None:
            calibrated.fingerprints["gradients"] = gradients.fingerprint

        def work(run: Run) -> None:
            _compress(settings, staged, windows, run, record, plan, fmt, plans, target_for, gradients)

    run = Run(settings.out, "compress", record, calibrated.fingerprints, staged.num_blocks, restart=settings.restart)
    try:
        if run.complete:
            log.info("%s is already complete; nothing to do (use --restart to redo it)", settings.out)
        else:
            work(run)
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


def check_structured(settings: CompressSettings) -> None:
    """A structured method takes none of the per-layer options: refuse them rather than ignore them."""
    name = settings.method.name
    if settings.target.quant is not None or settings.format != "dense":
        raise LayerpressError(f"{name} removes whole heads and channels: it takes no --wbits and writes --format dense")
    if settings.allocation.kind != "uniform" or settings.reconstruction.enabled:
        raise LayerpressError(f"{name} decides every block's share itself: it takes no --allocation or --reconstruct")


def check_reconstruction(settings: CompressSettings, staged: StagedModel) -> None:
    """Refuse reconstruction where its training would break what the output promises, before anything is written."""
    subsets = settings.reconstruction.subsets
    if not settings.reconstruction.enabled:
        return
    update = settings.reconstruction.weight_update
    if settings.target.quant is not None and update is not None:
        raise LayerpressError(f"--reconstruct {update} would move quantized weights off their grid: with --wbits, "
                              "train only biases and norms")
    if update == "lora" and settings.format != "dense":
        raise LayerpressError(f"--reconstruct lora fills pruned weights in: --format {settings.format} needs the zeros")
    if "biases" in subsets and all(layer.bias is None for layer in staged.linears(staged.blocks[0]).values()):
        raise LayerpressError(f"--reconstruct biases: this {staged.config.model_type} model has no biases and no "
                              "config flag that gives its linear layers some")


def check_plans(fmt: Format, plans: dict[str, LayerPlan]) -> None:
    """Refuse, before anything is written, a format that cannot hold these layers."""
    for plan in plans.values():
        fmt.check(plan)
    if fmt.name != "dense" and len({plan.dtype for plan in plans.values()}) > 1:
        raise LayerpressError(f"--format {fmt.name} needs all compressed weights in one dtype; use --format dense")


def apply_plan(settings: CompressSettings, staged: StagedModel, seqlen: int) -> Plan:
    """Fill in the settings the user left open from the memory plan (explicit ones win), and log the choice.

    Refuses (LayerpressError) a run that cannot fit. A resumed run keeps the micro-batch it started with, since the
    micro-batch is part of its recorded settings.
    """
    planner = Planner(
        ModelShapes.of(staged, settings.true_sequential),
        Workload(settings.method, settings.target, settings.calibration.nsamples, seqlen),
        settings.stream.device.type,
        settings.budget or Budget.of_machine(settings.stream.device),
        prefetch=settings.stream.prefetch,
    )
    plan = planner.choose(
        micro_batch=settings.micro_batch or _recorded_micro_batch(settings),
        activations="disk" if settings.stream.offload_dir is not None else None,
        per_layer_statistics=True if settings.statistics_per_layer else None,
    )
    choice = plan.choice
    offload_dir = settings.stream.offload_dir
    if offload_dir is None and choice.activations == "disk":
        offload_dir = settings.out / WORK_DIR / "activations"
    settings.stream = replace(
        settings.stream, micro_batch=choice.micro_batch, offload_dir=offload_dir,
        activations_on_device=choice.activations == "device",
    )
    log.info("plan: %s", plan.summary())
    available = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    if plan.host_peak > available:
        log.warning("the plan needs %.1f GiB of host memory, but only %.1f GiB is free now: the run may be killed",
                    plan.host_peak / 2**30, available / 2**30)
    return plan


def _recorded_micro_batch(settings: CompressSettings) -> int | None:
    """The micro-batch of the partial run in `settings.out` that this run resumes, if any."""
    if settings.restart or not (settings.out / WORK_DIR).is_dir():
        return None
    body = read_journal(settings.out)
    return body["settings"].get("micro_batch") if body is not None else None


@contextmanager
def _output(settings: CompressSettings, staged: StagedModel, run: Run, specs: list[TensorSpec]) -> Iterator[ShardWriter]:
    """The output's shard writer, resumed from the journal, with everything outside the blocks already copied."""
    state = WriterState(**run.body["writer"]) if "writer" in run.body else None
    writer = ShardWriter(settings.out, specs, settings.max_shard_bytes, state)
    try:
        non_block = staged.non_block_checkpoint_names()
        while writer.state.written < len(non_block):  # copied bit for bit, before the first block
            name = non_block[writer.state.written]
            writer.write(name, staged.read_for_copy(name))
        yield writer
    finally:
        writer.close()


def _write_block(writer: ShardWriter, tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
    """Append one block's tensors and make them durable; returns the seconds it took."""
    clock = time.perf_counter()
    for name, tensor in tensors:
        writer.write(name, tensor)
    writer.sync()
    return time.perf_counter() - clock


def _finish(settings: CompressSettings, staged: StagedModel, run: Run, writer: ShardWriter, config: dict,
            started: float) -> None:
    """Config, side files and index (the index last: only now does the output load), then close the journal."""
    atomic_write(settings.out / "config.json", json.dumps(config, indent=2).encode())
    copy_side_files(settings.model, settings.out)
    writer.write_index()
    run.finish({"seconds": time.perf_counter() - started, "bytes_written": writer.bytes_written,
                "bytes_read": staged.checkpoint.bytes_read})
    remove_offloaded_activations(settings.stream)
    log.info("wrote %s (%d shards)", settings.out, len(writer.shards))


def _compress(
    settings: CompressSettings, staged: StagedModel, windows: torch.Tensor, run: Run, record: dict, plan: Plan,
    fmt: Format, plans: dict[str, LayerPlan], target_for: Callable[[str], Target], gradients: GradientNorms | None,
) -> None:
    started = time.perf_counter()
    groups = list(staged.adapter.sequential_groups) if settings.true_sequential else [staged.adapter.linear_names]
    reconstruction = settings.reconstruction
    encoded = lambda name: fmt.specs(plans[name]) if name in plans else None  # noqa: E731
    with _output(settings, staged, run, output_specs(staged, encoded)) as writer, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerpress-writer") as background:
        pending: list[Future[float]] = []

        def process(context: BlockContext) -> dict[str, Any]:
            """Compress the block, then write it on the writer thread while the loop propagates through it."""
            journal: dict[str, Any] = {}
            precomputed = (
                {name: {"gradient_norms": norms} for name, norms in gradients.for_block(context).items()}
                if gradients is not None
                else {}
            )
            results = compress_block(  # with reconstruction: the dense outputs, its targets, kept in acts.outputs
                context, settings.method, groups, target_for, plan.choice.per_layer_statistics,
                keep_dense_outputs=reconstruction.enabled, precomputed=precomputed,
            )
            if reconstruction.enabled:
                report = reconstruct_block(context, reconstruction, settings.calibration.seed)
                journal["reconstruction"] = {str(context.index): asdict(report)}
            with context.phase("encode"):
                tensors = encoded_block_state(staged, context.index, fmt, plans, results)
            pending.append(background.submit(_write_block, writer, tensors.items()))
            layers = {context.layer_name(name): zero_fraction(result.weight) for name, result in results.items()}
            log.info("block %d/%d: sparsity %.2f%% over %d layers", context.index + 1, staged.num_blocks,
                     100 * sum(layers.values()) / max(len(layers), 1), len(layers))
            return {"layers": layers, **journal}

        def settle(context: BlockContext) -> dict[str, Any]:
            """Wait until the block is on disk (the journal may then record it)."""
            with context.phase("write wait"):
                context.phase.seconds["write"] = pending.pop().result()
            return {"writer": asdict(writer.state)}

        stream_blocks(staged, windows, settings.stream, process, run, desc="compress", settle=settle)
        config = output_config(staged, fmt, plans, {**record, "layer_sparsity": run.body["layers"]})
        if reconstruction.enabled:
            config["layerpress"]["reconstruction_summary"] = reconstruction_summary(
                run.body["reconstruction"], sum(math.prod(spec.shape) for _, spec in writer.order)
            )
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
    with _output(settings, staged, run, output_specs(staged, block_specs=layout.specs)) as writer:

        def process(index: int, block: nn.Module) -> dict[str, Any]:
            tensors = structured.prune_block(method, staged, summaries, plan, index, block)
            kept = {f"{staged.block_prefix(index)}{name}": int(plan.keep[name][index].sum()) for name in plan.keep}
            log.info("prune: block %d/%d: units kept %s", index + 1, staged.num_blocks,
                     ", ".join(f"{name} {count}/{staged.layouts[name].units_in(block)}"
                               for name, count in zip(plan.keep, kept.values())))
            _write_block(writer, layout.block_tensors(index, tensors))
            return {"writer": asdict(writer.state), "layers": kept}

        walk_blocks(staged, process, run, desc="prune")
        config = dict(staged.checkpoint.config)
        config[STRUCTURE_KEY] = layout.structure
        config["layerpress"] = {**record, "kept_units": run.body["layers"], "parameters": plan.parameters}
        _finish(settings, staged, run, writer, config, started)
