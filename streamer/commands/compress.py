"""`compress`: check the settings, plan the run, then stream the blocks through their phases into the output.

    settings checked ─► checkpoint opened, calibration windows cut ─► memory plan (the settings left open)
    ─► per-layer targets (allocation, bits policy) ─► output planned ─► block loop (streamer/stream.py), each block:
       read ─► observe ─► compress ─► [reconstruct] (streamer/block.py) ─► encode ─► write (behind) ─► propagate
       ─► journal ─► config.json, index (streamer/output.py)

A structured method (FLAP) decides for the whole model at once, so it runs in passes instead
(streamer/commands/structured.py): statistics pass (streamed) ─► search ─► pruning pass.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from methods import LayerResult, Method, StructuredMethod, Target
from methods.reconstruct import Reconstruction

from ..allocation import Allocation, BitsPolicy
from ..block import DEFAULT_EXPERT_MIN_TOKENS, check_expert_min_tokens, compress_block, reconstruct_block, \
    zero_fraction
from ..checkpoint import Checkpoint
from ..data import Calibration, CalibrationOptions
from ..decoded import DecodedCheckpoint
from ..distributed import world
from ..errors import LayerpressError
from ..formats import FORMATS, Format, LayerPlan
from ..gradient_norms import GradientNorms
from ..journal import Run
from ..model import StagedModel
from ..output import (
    check_plans, encoded_block_state, finish_output, layer_plans, model_output, output_config, output_specs,
    reconstruction_summary, write_block,
)
from ..planner import Budget, Plan, Workload
from ..stream import BlockContext, Calibrated, StreamOptions, open_calibrated, remove_offloaded_activations, \
    stream_blocks
from .lifecycle import RunRequest
from .planning import PlanChoices, plan_pass, planned_stream
from .structured import compress_structured

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
    stream: StreamOptions = field(default_factory=StreamOptions)  # as given; the plan fills in what is left open
    micro_batch: int | None = None  # None: the largest the plan fits (a resumed run keeps its own)
    statistics_per_layer: bool = False  # force it; otherwise the plan turns it on when a group's do not fit
    budget: Budget | None = None  # memory the plan may use; None: the machine's totals
    process_bytes: int | None = None  # host memory the process holds before the run; None: measured when planning
    format: str = "dense"
    allocation: Allocation = field(default_factory=Allocation)
    bits: BitsPolicy = field(default_factory=BitsPolicy)  # per-layer bit widths (CPTQuant)
    reconstruction: Reconstruction = field(default_factory=Reconstruction)
    gradients: Path | None = None  # a `main.py gradients` directory, for methods that use gradient norms
    expert_min_tokens: int = DEFAULT_EXPERT_MIN_TOKENS  # mixture of experts: see streamer/block.py
    compress_router: bool = False  # mixture of experts: the router is compressed too (streamer/experts.py)

    def __post_init__(self) -> None:
        check_expert_min_tokens(self.expert_min_tokens)
        if self.compress_router and self.format != "dense":
            raise LayerpressError(f"--compress-router writes the router dense: transformers' router is no linear "
                                  f"layer, which --format {self.format} (compressed-tensors) needs")
        if self.compress_router and "gradient_norms" in getattr(self.method, "precomputed", ()):
            raise LayerpressError(f"--compress-router: {self.method.name} needs the router's gradient norms, which "
                                  "`main.py gradients` does not record")
        if self.target.pattern is not None and self.allocation.kind != "uniform":
            raise LayerpressError("an N:M pattern fixes every layer's sparsity: use --allocation uniform with --pattern")

    def record(self, calibration: dict[str, Any], dtype: torch.dtype, stream: StreamOptions,
               experts: bool = False) -> dict[str, Any]:
        """Everything that changes the output, with the stream options the run uses: kept in the journal (resume
        must match) and in config.json (experts: the model has a mixture of experts)."""
        return {
            "method": self.method.name,
            "method_settings": self.method.settings(),
            "sparsity": self.target.sparsity,
            "pattern": f"{self.target.pattern[0]}:{self.target.pattern[1]}" if self.target.pattern else None,
            "quantization": self.quantization_record(),
            "format": self.format,
            "calibration": calibration,
            "dtype": str(dtype).removeprefix("torch."),
            "device": stream.device.type,
            "true_sequential": self.true_sequential,
            "micro_batch": stream.micro_batch,
            "max_shard_bytes": self.max_shard_bytes,
            # uniform leaves the record as it was before allocations existed, so older partial runs still resume
            **({} if self.allocation.kind == "uniform" else {"allocation": self.allocation.record(self.target.sparsity)}),
            **({"reconstruction": self.reconstruction.settings()} if self.reconstruction.enabled else {}),
            **({"expert_min_tokens": self.expert_min_tokens} if experts else {}),
            **({"compress_router": True} if self.compress_router else {}),  # absent: older runs resume
        }

    @property
    def plan_choices(self) -> PlanChoices:
        return PlanChoices(self.budget, self.process_bytes, self.micro_batch, self.statistics_per_layer)

    def quantization_record(self) -> dict[str, Any] | None:
        """The grid of every layer; with a bits policy, bits null (each layer's are in `layer_bits`)."""
        if self.target.quant is None:
            return None
        return {**asdict(self.target.quant), **({"bits": None} if self.bits.enabled else {})}


def compress(settings: CompressSettings) -> Path:
    """Compress a checkpoint block by block into `settings.out`; resumes a partial run of the same settings."""
    request = RunRequest("compress", settings.out, settings.model, settings.restart)
    structured = isinstance(settings.method, StructuredMethod)
    if structured:
        check_structured(settings)
    else:
        check_method(settings)
    calibrated = open_calibrated(
        settings.model, settings.calibration, settings.stream.device, settings.dtype,
        add_biases="biases" in settings.reconstruction.subsets, compress_router=settings.compress_router,
    )
    staged = calibrated.staged
    if structured:
        stream = planned_stream(settings.stream, plan_compress(settings, staged, calibrated.seqlen), settings.out)
        record = settings.record(calibrated.calibration.record, staged.dtype, stream)

        def work(run: Run) -> None:
            compress_structured(settings.method, staged, calibrated.windows, stream, settings.out, settings.model,
                                settings.max_shard_bytes, run, record)
            remove_offloaded_activations(stream)
    else:
        check_reconstruction(settings, staged)
        plan = plan_compress(settings, staged, calibrated.seqlen)
        stream = planned_stream(settings.stream, plan, settings.out)
        has_experts = staged.adapter.experts is not None
        record = settings.record(calibrated.calibration.record, staged.dtype, stream, has_experts)
        target_for = layer_targets(settings, staged, record)
        fmt = FORMATS[settings.format]
        plans = layer_plans(staged, settings.method, target_for)
        check_plans(fmt, plans)
        gradients = gradient_norms(settings, staged.checkpoint, calibrated.calibration)
        if gradients is not None:
            calibrated.fingerprints["gradients"] = gradients.fingerprint
        layers = LayerCompression(settings.method, target_for, fmt, plans, gradients, plan.choice.per_layer_statistics)

        def work(run: Run) -> None:
            _compress(settings, calibrated, stream, run, record, layers)
            remove_offloaded_activations(stream)

    request.execute(record, calibrated.fingerprints, staged.num_blocks, work)
    return settings.out


# ---------------------------------------------------------------------- settings checked before anything is read
def check_structured(settings: CompressSettings) -> None:
    """A structured method takes none of the per-layer options: refuse them rather than ignore them."""
    target = settings.target
    given = [option for option, value in (
        ("--sparsity", target.sparsity != 0.0),
        ("--pattern", target.pattern is not None),
        ("--true-sequential", settings.true_sequential),
        ("--wbits", target.quant is not None and not settings.bits.enabled),
        ("--bits-policy", settings.bits.enabled),
        ("--format", settings.format != "dense"),
        ("--allocation", settings.allocation.kind != "uniform"),
        ("--reconstruct", settings.reconstruction.enabled),
    ) if value]
    if given:
        raise LayerpressError(f"--method {settings.method.name} removes whole heads and channels (--ratio) and "
                              f"decides every block's share itself; {', '.join(given)} applies to unstructured "
                              "methods only")


def check_method(settings: CompressSettings) -> None:
    """Refuse a target the method cannot reach."""
    if settings.bits.enabled and (settings.target.quant is None or not settings.method.quantizes):
        raise LayerpressError(f"--bits-policy chooses each layer's bit width: use a method that quantizes (gptq, "
                              f"rtn, sparsegpt), not {settings.method.name}")
    try:
        settings.method.check(settings.target)
    except ValueError as exc:
        raise LayerpressError(str(exc)) from exc


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


# ---------------------------------------------------------------------- the plan and the per-layer targets
def plan_compress(settings: CompressSettings, staged: StagedModel, seqlen: int) -> Plan:
    """The memory plan of this run (explicit settings win; a resumed run keeps its micro-batch); refuses
    (LayerpressError) a run that cannot fit."""
    workload = Workload(settings.method, settings.target, settings.calibration.nsamples, seqlen,
                        reconstruction=settings.reconstruction, world_size=world().size)
    return plan_pass(staged, workload, settings.stream, settings.plan_choices, settings.out, settings.restart,
                     settings.true_sequential)


def layer_targets(settings: CompressSettings, staged: StagedModel, record: dict[str, Any]) -> Callable[[str], Target]:
    """Each layer's target (by full layer name) from the allocation and the bits policy; their choices go into
    `record`, so that config.json and the resume check carry them."""
    sparsities = None
    if settings.allocation.kind != "uniform":
        sparsities = settings.allocation.layer_sparsities(staged.linear_layers(), settings.target.sparsity)
        record["layer_targets"] = sparsities
        log.info("allocation %s: layer sparsities from %.4f to %.4f", settings.allocation.kind,
                 min(sparsities.values()), max(sparsities.values()))
    bits = None
    if settings.bits.enabled:
        bits, record["bits_policy"] = settings.bits.layer_bits(staged.linear_layers())
        record["layer_bits"] = bits
        log.info("bits policy %s: %d of %d layers at %d bits, average %.4f bits per weight", settings.bits.kind,
                 sum(width == max(bits.values()) for width in bits.values()), len(bits), max(bits.values()),
                 record["bits_policy"]["achieved_avg_bits"])

    def target_for(name: str) -> Target:
        target = settings.target
        if sparsities is not None:
            target = replace(target, sparsity=sparsities[name])
        if bits is not None:
            target = replace(target, quant=replace(target.quant, bits=bits[name]))
        return target

    return target_for


def gradient_norms(
    settings: CompressSettings, checkpoint: Checkpoint | DecodedCheckpoint, calibration: Calibration
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


# ---------------------------------------------------------------------- the block loop
@dataclass(frozen=True)
class LayerCompression:
    """What every block's layers are compressed with and written as, decided before the first block."""

    method: Method
    target_for: Callable[[str], Target]
    format: Format
    plans: dict[str, LayerPlan]  # by checkpoint weight name
    gradients: GradientNorms | None
    per_layer_statistics: bool

    def precomputed(self, context: BlockContext) -> dict[str, dict[str, torch.Tensor]]:
        """The per-weight tensors of an earlier pass that the method's statistics take, by layer name."""
        if self.gradients is None:
            return {}
        return {name: {"gradient_norms": norms} for name, norms in self.gradients.for_block(context).items()}


def _compress(settings: CompressSettings, calibrated: Calibrated, stream: StreamOptions, run: Run,
              record: dict[str, Any], layers: LayerCompression) -> None:
    started = time.perf_counter()
    staged = calibrated.staged
    groups = list(staged.adapter.sequential_groups) if settings.true_sequential else [staged.adapter.linear_names]
    reconstruction = settings.reconstruction
    encoded = lambda name: layers.format.specs(layers.plans[name]) if name in layers.plans else None  # noqa: E731
    specs = output_specs(staged, encoded)
    writes = world().is_writer  # under torchrun rank 0 alone writes; every rank compresses and propagates
    output = model_output(settings.out, staged, specs, settings.max_shard_bytes, run) if writes else nullcontext()
    with output as writer, ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerpress-writer") as background:
        pending: list[Future[float]] = []

        def process(context: BlockContext) -> dict[str, Any]:
            """Compress the block, then write it on the writer thread while the loop propagates through it."""
            journal: dict[str, Any] = {}
            results = compress_block(  # with reconstruction: the dense outputs, its targets, kept in acts.outputs
                context, layers.method, groups, layers.target_for, layers.per_layer_statistics,
                keep_dense_outputs=reconstruction.enabled, precomputed=layers.precomputed(context),
                expert_min_tokens=settings.expert_min_tokens,
            )
            if reconstruction.enabled:
                report = reconstruct_block(context, reconstruction, settings.calibration.seed)
                journal["reconstruction"] = {str(context.index): asdict(report)}
            if writes:
                with context.phase("encode"):
                    tensors = encoded_block_state(staged, context.index, layers.format, layers.plans, results)
                pending.append(background.submit(write_block, writer, tensors.items()))
            sparsity = {context.layer_name(name): zero_fraction(result.weight) for name, result in results.items()}
            log.info("block %d/%d: sparsity %.2f%% over %d layers", context.index + 1, staged.num_blocks,
                     100 * sum(sparsity.values()) / max(len(sparsity), 1), len(sparsity))
            return {"layers": sparsity, "layer_info": _layer_info(context, results), **journal}

        def settle(context: BlockContext) -> dict[str, Any]:
            """Wait until the block is on disk (the journal may then record it)."""
            if not writes:
                return {}
            with context.phase("write wait"):
                context.phase.seconds["write"] = pending.pop().result()
            return {"writer": asdict(writer.state)}

        stream_blocks(staged, calibrated.windows, stream, process, run, desc="compress", settle=settle)
        if not writes:
            return
        config = output_config(staged, layers.format, layers.plans, {**record, "layer_sparsity": run.body["layers"]})
        if reconstruction.enabled:
            config["layerpress"]["reconstruction_summary"] = reconstruction_summary(
                run.body["reconstruction"], sum(math.prod(spec.shape) for _, spec in writer.order)
            )
        finish_output(settings.out, settings.model, run, writer, config, started, staged.checkpoint.bytes_read)


def _layer_info(context: BlockContext, results: dict[str, LayerResult]) -> dict[str, dict[str, float]]:
    """What the method reported of each layer (OBS loss estimate, damping used), for the journal and `status`."""
    return {context.layer_name(name): result.info for name, result in results.items() if result.info}
