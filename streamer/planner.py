"""Will a run fit, and how long will it take? Predicted from config.json and the shard headers alone.

`python main.py plan` prints the plan; `compress` asks it for the settings the user left open (the micro-batch,
where the activation buffers live, whether a group's statistics are observed together or one layer at a time)
and refuses a run that cannot fit. The model is counted, never loaded: shapes come from transformers' skeleton on
the meta device (streamer/model.py), stored sizes from the shard headers, and what a method needs per layer from
the method itself (`Statistic.nbytes` of a statistic made on the meta device, `Method.layer_cost`).

What each phase holds at its peak, besides the process itself and the activation buffers where they live:

    embed      the pre-block stage and one micro-batch through it
    read       the block arriving (and its stored copy, when it goes to a GPU or changes dtype)
    observe    the block, the statistics observed together, the forward's transients, a statistic's input copy
    compress   the block, the statistics still waiting, one layer's working memory, the results kept so far
    write      the block, its host copy in the stored dtypes, every layer's kept result (masks, grid integers)
    propagate  the block and the forward's transients; that host copy, which the writer thread is writing meanwhile
    eval head  the final stage and one micro-batch of logits (when the output is evaluated)

Each command goes through its own phases (`COMMANDS`): `scores` observes and scores (a layer's factor, the sweep and
the sensitivities) but writes nothing; `--reconstruct` adds a training phase after compress; `flap` observes its
channel statistics, propagates, then cuts and writes each block in a second pass without activations; `gradients`
propagates keeping every block's inputs on disk, takes the loss at the head and walks the blocks back with
autograd; `eval` only propagates, then scores at the head.

With prefetch, every block phase also holds the next block, read ahead (host).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Collection
from typing import Callable

import psutil
import torch
from torch import nn

from methods import Method, StructuredMethod, Target
from methods.base import LayerCost, Statistic
from methods.reconstruct import PROBE_WINDOWS, Reconstruction
from methods.statistics import tf32_products

from . import hostmemory
from .adapters.base import group_by_input
from .errors import LayerpressError
from .model import StagedModel

log = logging.getLogger("layerpress")

GiB = 2**30
# Transient memory of one block forward per token, in units of the compute dtype: hidden-sized and FFN-sized
# tensors alive at once (residual, norm, q/k/v, attention output; FFN input, activation, product). Measured on a
# CPU with OPT, Llama and BLOOM blocks (hidden 1024, FFN 4096, 4 x 512 tokens): 0.65-1.0 of this estimate.
FORWARD_HIDDEN_COPIES, FORWARD_FFN_COPIES = 8, 4
# Tokens a forward needs to run at full speed; beyond this, bigger micro-batches only cost memory. On a GPU it is
# the rows a matmul needs. On a CPU it is what amortizes each call's fixed costs (hooks, small ops, a statistic's
# update): SmolLM2 SparseGPT 50% at 32 x 512 in bf16 took 41.6 s at micro-batch 1, 37.2 at 2, 34.9 at 4 and 35.3
# at 8 (2 threads); float32 the same at 1 and 4 (66.4, 68.5 s); one bare block forward at 2048 tokens runs no
# faster in two windows than in one.
TOKENS_PER_FORWARD = {"cuda": 16384, "cpu": 2048}
# Assumptions for CUDA, which this planner cannot measure without the device: the context with cuBLAS/cuSOLVER
# workspaces on the device, the CUDA libraries in host memory, and the caching allocator's fragmentation.
CUDA_CONTEXT_BYTES = 1 * GiB
CUDA_HOST_RUNTIME_BYTES = 2 * GiB
DEVICE_MARGIN = 0.05
ACTIVATION_PLACES = ("device", "host", "disk")
KEPT_RESULTS = "results kept for the write"  # masks and grid integers of the layers compressed so far
COMMANDS = ("compress", "scores", "gradients", "eval")
# Autograd over one block forward holds what the forward saves for the backward (the inputs of every matmul,
# normalization and activation) while the backward makes as much again: measured on a CPU with Llama, OPT and
# BLOOM blocks (tools/phase_memory.py), about twice the forward's transients.
AUTOGRAD_FORWARD_COPIES = 2
# --reconstruct trains against frozen inputs: autograd keeps each linear layer's input (for its trainable update),
# the norms' and attention's inputs and the activation, not the inputs' gradients: about 9 hidden-wide and 2
# FFN-wide tensors a token against the forward's 8 and 4 (0.71 on OPT). Measured on a CPU (OPT, hidden 2048, FFN
# 8192, 512 tokens a window, float32, biases,norms,masklora; tools/phase_memory.py): the reconstruct phase peaked at
# 1236, 1280, 1384 and 1640 MiB at micro-batch 1, 2, 4 and 8, 44-64 MiB a window, 0.46-0.67 of the forward's 96.
TRAINING_FORWARD_COPIES = 0.75
# Positions of a window the gradient pass's head runs at once (streamer/commands/gradients.py: head_loss).
GRADIENT_HEAD_POSITIONS = 64


def resident_bytes() -> int:
    """This process's live resident memory now: the baseline every phase adds to (torch, transformers, the skeleton,
    the tokenizer). Freed memory is given back first: after tokenizing the calibration text, glibc still held 66 MiB
    of freed arenas that the run reuses, and counting them made the plan of a SmolLM2 compress 11% too high."""
    gc.collect()
    hostmemory.trim()
    return psutil.Process().memory_info().rss


def process_baseline(device_type: str) -> int:
    """What this process holds before a run starts: its resident memory, and on a GPU not yet initialized the CUDA
    libraries it will load into host memory."""
    size = resident_bytes()
    if device_type != "cpu" and not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        size += CUDA_HOST_RUNTIME_BYTES
    return size


def gib(size: float) -> str:
    """A size as people read it: GiB, or MiB below one GiB."""
    return f"{size / GiB:.2f} GiB" if size >= GiB else f"{size / 2**20:.0f} MiB"


@dataclass(frozen=True)
class Budget:
    """Memory a run may use, in bytes. On a CPU the device is the host: only `host` counts."""

    device: int
    host: int

    @classmethod
    def of_machine(cls, device: torch.device, device_memory: int | None = None, host_memory: int | None = None):
        """The given sizes, else this machine's totals (totals, not what is free now: a plan must not change
        between a run and its resume)."""
        host = host_memory or psutil.virtual_memory().total
        if device_memory is None:
            if device.type == "cuda":
                if not torch.cuda.is_available():
                    raise LayerpressError("planning for cuda without a GPU here: give --device-memory")
                device_memory = torch.cuda.mem_get_info(device)[1]
            else:
                device_memory = host
        return cls(device=device_memory, host=host)


@dataclass(frozen=True)
class LinearShape:
    name: str
    rows: int
    columns: int


@dataclass(frozen=True)
class ModelShapes:
    """What the planner needs to know of a model: sizes from the meta skeleton and the shard headers."""

    family: str
    blocks: int
    block_bytes: int  # the largest block, in the compute dtype
    block_stored_bytes: int  # the same, as stored in the checkpoint
    pre_stage_bytes: int
    head_bytes: int
    hidden: int
    heads: int
    vocab: int
    linears: tuple[LinearShape, ...]  # in forward order
    groups: tuple[tuple[str, ...], ...]  # observed and compressed together
    shared_inputs: tuple[tuple[str, ...], ...]  # layers called with one input tensor (Adapter.shared_inputs)
    consumers: tuple[str, ...]  # the channel groups' consumer layers (structured methods observe only these)
    channel_groups: tuple[tuple[str, ...], ...]  # each channel group's producers and consumer (cut together)
    dtype: torch.dtype  # compute dtype
    converts: bool  # the compute dtype differs from a stored floating dtype (a copy at read and write)
    eager_attention: bool  # attention scores materialized (seqlen² per head)

    @classmethod
    def of(cls, staged: StagedModel, true_sequential: bool = False) -> ModelShapes:
        state = staged.model.state_dict(keep_vars=True)  # meta tensors: shapes only
        dtype = staged.dtype

        def compute_bytes(names: list[str]) -> int:
            return sum(state[n].numel() * (dtype if state[n].is_floating_point() else state[n].dtype).itemsize
                       for n in names)

        def stored_bytes(names: list[str]) -> int:
            specs = (staged.tensor_spec(n) for n in dict.fromkeys(staged.checkpoint_names(names)))
            return sum(math.prod(shape) * stored.itemsize for stored, shape in specs)

        block_names = [staged.block_names(i) for i in range(staged.num_blocks)]
        linears = tuple(
            LinearShape(name, layer.out_features, layer.in_features)
            for name, layer in staged.linears(staged.blocks[0]).items()
        )
        adapter = staged.adapter
        config = staged.config
        return cls(
            family=adapter.name,
            blocks=staged.num_blocks,
            block_bytes=max(compute_bytes(names) for names in block_names),
            block_stored_bytes=max(stored_bytes(names) for names in block_names),
            pre_stage_bytes=compute_bytes(staged.pre_stage_names()),
            head_bytes=compute_bytes(staged.final_stage_names()),
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            vocab=config.vocab_size,
            linears=linears,
            groups=tuple(adapter.sequential_groups) if true_sequential else (adapter.linear_names,),
            shared_inputs=adapter.shared_inputs,
            consumers=tuple(group.consumer for group in adapter.channel_groups),
            channel_groups=tuple((*group.producers, group.consumer) for group in adapter.channel_groups),
            dtype=dtype,
            converts=any(e.dtype.is_floating_point and e.dtype != dtype for e in staged.checkpoint.entries.values()),
            eager_attention=getattr(config, "_attn_implementation", "eager") == "eager",
        )

    @property
    def ffn(self) -> int:
        return max(linear.rows for linear in self.linears)

    @property
    def linear_parameters(self) -> int:
        return sum(linear.rows * linear.columns for linear in self.linears)


@dataclass(frozen=True)
class Workload:
    """What the run does: the command, its method (None: no per-layer statistics, as for eval and gradients), its
    target, the calibration set (for eval: the evaluation windows).

    method: a `Method`; a `StructuredMethod` (flap); or for `scores`, anything with a Method's planning interface
        (`statistic`, `layer_cost`, `precomputed`, `name`), as methods.scores.Scorer has.
    reconstruction: compress --reconstruct's settings (None or not enabled: no training phase).
    """

    method: Method | StructuredMethod | None
    target: Target
    nsamples: int
    seqlen: int
    command: str = "compress"
    reconstruction: Reconstruction | None = None
    world_size: int = 1  # torchrun processes sharing the windows (streamer/distributed.py); the plan is one rank's

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise LayerpressError(f"no plan for {self.command!r}: plans cover {', '.join(COMMANDS)}")
        if self.world_size < 1:
            raise LayerpressError(f"--world-size must be at least 1, got {self.world_size}")

    @property
    def rank_windows(self) -> int:
        """The windows one rank holds (the largest share)."""
        return -(-self.nsamples // self.world_size)

    @property
    def structured(self) -> bool:
        return isinstance(self.method, StructuredMethod)

    @property
    def reconstructs(self) -> bool:
        return self.reconstruction is not None and self.reconstruction.enabled


@dataclass(frozen=True)
class Choice:
    """The settings a plan decides."""

    micro_batch: int
    activations: str  # "device", "host" or "disk" (memory-mapped files)
    per_layer_statistics: bool  # observe one input (its layers) at a time, not a whole group

    def describe(self, device_type: str, statistics: bool = True) -> str:
        """statistics: whether the pass observes per-layer statistics (eval and gradients do not)."""
        where = {"device": f"on the {device_type}", "host": "in host RAM", "disk": "offloaded to disk"}
        text = f"micro-batch {self.micro_batch}, activations {where[self.activations]}"
        if statistics:
            text += ", statistics " + ("one layer at a time" if self.per_layer_statistics else "a group of layers at a time")
        return text


@dataclass
class PhaseMemory:
    """The peak of one phase: named parts on the device and on the host."""

    name: str
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    required: bool = True  # False: shown, but the run does not go through it (the head, for compress)

    @property
    def device_peak(self) -> int:
        return sum(self.device.values())

    @property
    def host_peak(self) -> int:
        return sum(self.host.values())


@dataclass(frozen=True)
class LayerNeeds:
    """One linear layer's statistic and the method's cost for it, in bytes and work."""

    linear: LinearShape
    statistic: int
    cost: LayerCost


class Planner:
    """Predicts each phase's peak memory for a choice of settings, and chooses the settings that fit."""

    def __init__(
        self,
        shapes: ModelShapes,
        workload: Workload,
        device_type: str,
        budget: Budget,
        process_bytes: int,
        prefetch: bool = True,
    ):
        """process_bytes: the host memory every phase adds to (see `process_baseline`)."""
        self.shapes, self.workload, self.device_type, self.budget = shapes, workload, device_type, budget
        self.prefetch = prefetch
        self.on_gpu = device_type != "cpu"
        self.process_bytes = process_bytes
        self.layers = {linear.name: self._needs(linear) for linear in shapes.linears}
        self.statistic_dtype = self._statistic_dtype()

    def _needs(self, linear: LinearShape) -> LayerNeeds:
        method, dtype = self.workload.method, self.shapes.dtype
        if method is None or (self.workload.structured and linear.name not in self.shapes.consumers):
            return LayerNeeds(linear, 0, LayerCost(working_bytes=0))
        if self.workload.structured:  # its statistic; cutting a block is planned as a whole (the prune phase)
            layer = nn.Linear(linear.columns, linear.rows, bias=False, device="meta", dtype=dtype)
            return LayerNeeds(linear, method.statistic(layer).nbytes, LayerCost(working_bytes=0))
        statistic = self._meta_statistic(linear, dtype)
        cost = method.layer_cost(linear.rows, linear.columns, dtype, self.workload.target)
        size = statistic.nbytes if statistic is not None else 0
        return LayerNeeds(linear, size, cost)

    def _meta_statistic(self, linear: LinearShape, dtype: torch.dtype | None) -> Statistic | None:
        """The method's statistic for a layer of this shape on the meta device (sizes only), given any per-weight
        tensors it takes from an earlier pass."""
        precomputed = {name: torch.empty(linear.rows, linear.columns, device="meta")
                       for name in self.workload.method.precomputed}
        layer = nn.Linear(linear.columns, linear.rows, bias=False, device="meta", dtype=dtype)
        return self.workload.method.statistic(layer, **precomputed)

    def _statistic_dtype(self) -> torch.dtype | None:
        method = self.workload.method
        if method is None or self.workload.structured:
            return None
        statistic = self._meta_statistic(self.shapes.linears[0], None)
        tensors = [v for v in vars(statistic).values() if isinstance(v, torch.Tensor)] if statistic else []
        return tensors[0].dtype if tensors else None

    @property
    def observes(self) -> bool:
        """Whether the pass observes statistics of the layers' inputs."""
        return any(layer.statistic for layer in self.layers.values())

    # ------------------------------------------------------------------ memory
    def activation_buffer_bytes(self) -> int:
        w = self.workload
        return w.rank_windows * w.seqlen * self.shapes.hidden * self.shapes.dtype.itemsize

    def forward_transient(self, micro_batch: int) -> int:
        s, seqlen = self.shapes, self.workload.seqlen
        size = micro_batch * seqlen * s.dtype.itemsize * (FORWARD_HIDDEN_COPIES * s.hidden + FORWARD_FFN_COPIES * s.ffn)
        if s.eager_attention:
            size += micro_batch * s.heads * seqlen * seqlen * (s.dtype.itemsize + 4)
        return size

    def phases(self, choice: Choice) -> list[PhaseMemory]:
        s, w = self.shapes, self.workload
        tokens = choice.micro_batch * w.seqlen
        buffers = 2 * self.activation_buffer_bytes()
        staging = s.block_stored_bytes if self.on_gpu or s.converts else 0

        def phase(name: str, on_device: dict[str, int], on_host: dict[str, int] | None = None) -> PhaseMemory:
            device = {"activation buffers": buffers} if choice.activations == "device" else {}
            if self.on_gpu:
                device["CUDA context"] = CUDA_CONTEXT_BYTES
            device.update(on_device)
            host = {"process": self.process_bytes}
            if choice.activations == "host":
                host["activation buffers"] = buffers
            host.update(on_host or {})
            if not self.on_gpu:  # the device is the host: one pool
                host.update({k: host.get(k, 0) + v for k, v in device.items()})
                device = {}
            return PhaseMemory(name, {k: v for k, v in device.items() if v}, {k: v for k, v in host.items() if v})

        pipeline = {"block read ahead": s.block_stored_bytes} if self.prefetch and s.blocks > 1 else {}
        masks = {"block call masks": choice.micro_batch * w.seqlen * w.seqlen * 4}
        block = {"block": s.block_bytes, **masks}
        transients = {"forward transients": self.forward_transient(choice.micro_batch)}
        result = [
            phase("embed", {"pre-block stage": s.pre_stage_bytes, "embedded micro-batch": 3 * tokens * s.hidden
                            * s.dtype.itemsize}),
            phase("read", dict(block), {"block as stored": staging, **pipeline}),
        ]
        writes = w.command == "compress"
        if w.structured:  # statistics pass, then the pruning pass: a block and its cut copy, no activations
            result.append(phase("observe", {**block, **transients,
                                            "channel statistics": sum(n.statistic for n in self.layers.values())},
                                pipeline))
            # a group's cut layers replace its dense ones as they are made (structured.prune_block): at most the
            # largest group's weights twice; the cut block goes out a tensor at a time, one converted copy
            sizes = {linear.name: linear.rows * linear.columns for linear in s.linears}
            cut_group = max((sum(sizes[name] for name in group) for group in s.channel_groups), default=0)
            largest_stored = max(sizes.values()) * s.dtype.itemsize * s.block_stored_bytes // s.block_bytes
            cut = {"block": s.block_bytes, "cut layers of a group": cut_group * s.dtype.itemsize}
            result.append(phase("prune", cut, {"tensor copy to write": largest_stored if staging else 0, **pipeline}))
        elif w.method is not None:
            observe, compress = self._statistics_peaks(choice, tokens)
            results = {KEPT_RESULTS: sum(layer.cost.kept_bytes for layer in self.block_layers())}
            result.append(phase("observe", {**block, **observe}, pipeline))
            result.append(phase("compress" if writes else "score", {**block, **compress}, pipeline))
            if w.reconstructs:
                result.append(phase("reconstruct", {**block, **results, **self._training_parts(choice)}, pipeline))
            if writes:
                result.append(phase("write", {**block, **results}, {"block copy to write": staging, **pipeline}))
        writing = {"block being written": staging} if writes and not w.structured else {}
        result.append(phase("propagate", {**block, **transients}, {**writing, **pipeline}))
        block_statistic = w.method.block_statistic_bytes(s.hidden, tokens) if w.method is not None else 0
        if block_statistic:  # e.g. CMPQ's: the block's input and output correlated after it is propagated
            result.append(phase("correlate", {"block statistic": block_statistic}, pipeline))
        if w.command == "gradients":
            return result + self._gradient_phases(choice, phase, block)
        logits = tokens * s.vocab * (s.dtype.itemsize + 4 + 4)  # logits, in float32, log-softmax
        head = phase("eval head", {"final stage": s.head_bytes, "logits of a micro-batch": logits})
        head.required = w.command == "eval"
        return result + [head]

    def _training_parts(self, choice: Choice) -> dict[str, int]:
        """What --reconstruct's training holds besides the block (methods/reconstruct.py): the float32 trainable
        copies with their gradients and AdamW's two moments; for a weight update, every weight rebuilt from its
        frozen weight and the low-rank factors (autograd keeps the rebuilt weight and its zero mask per layer, and
        the largest layer's float32 rebuild is alive while it is made); the forward's saved activations; one
        micro-batch of inputs and targets."""
        s, settings = self.shapes, self.workload.reconstruction
        linears = s.linears
        trainable = 0
        if "biases" in settings.subsets:
            trainable += sum(linear.rows for linear in linears)
        if "norms" in settings.subsets:
            trainable += 2 * s.hidden * 4  # a few norms of weights and biases, hidden-sized
        parts = {}
        if settings.weight_update is not None:
            trainable += settings.rank * sum(linear.rows + linear.columns for linear in linears)
            largest = max(linear.rows * linear.columns for linear in linears)
            parts["weights rebuilt for autograd"] = (s.linear_parameters * (1 + s.dtype.itemsize) + 5 * 4 * largest)
        parts["trainable copies, gradients, AdamW moments"] = 4 * 4 * trainable
        parts["saved activations"] = int(TRAINING_FORWARD_COPIES * self.forward_transient(choice.micro_batch))
        parts["micro-batch and its targets"] = 2 * choice.micro_batch * self.workload.seqlen * s.hidden * 4
        return parts

    def _gradient_phases(
        self, choice: Choice, phase: Callable[..., PhaseMemory], block: dict[str, int]
    ) -> list[PhaseMemory]:
        """The gradient pass after its forward (streamer/commands/gradients.py): the loss at the head, a few
        positions at a time; then each block's backward over one micro-batch, with its squared-gradient sums (float32,
        one per weight) and one window's weight gradient of the layer being accumulated. Blocks are loaded one at a time (no read-ahead)."""
        s, w = self.shapes, self.workload
        tokens = choice.micro_batch * w.seqlen
        hidden_batch = tokens * s.hidden * (s.dtype.itemsize + 2 * 4)  # inputs, their gradient and the output's
        head_logits = choice.micro_batch * GRADIENT_HEAD_POSITIONS * s.vocab * 3 * 4  # logits, softmax, gradient
        largest = max(linear.rows * linear.columns for linear in s.linears)
        return [
            phase("head", {"final stage": s.head_bytes, "logits of a few positions": head_logits,
                           "hidden states and gradients": hidden_batch}),
            phase("backward", {**block, "squared-gradient sums": 4 * s.linear_parameters,
                               "one window's weight gradient": 4 * largest,
                               "saved activations": AUTOGRAD_FORWARD_COPIES * self.forward_transient(choice.micro_batch),
                               "hidden states and gradients": hidden_batch}),
        ]

    def block_layers(self) -> list[LayerNeeds]:
        return [self.layers[name] for group in self.shapes.groups for name in group]

    def by_input(self, group: tuple[str, ...]) -> list[tuple[str, ...]]:
        """The group's layers by the statistic they observe, as streamer/block.py makes them: one per distinct
        input when the method's statistic is the input's (`statistic_per_input`), else one per layer."""
        if self.workload.method is not None and self.workload.method.statistic_per_input:
            return group_by_input(group, self.shapes.shared_inputs)
        return [(name,) for name in group]

    def observed_inputs(self) -> list[tuple[str, ...]]:
        """Every group's layers by the statistic they observe (the first of each tuple stands for them all)."""
        return [readers for group in self.shapes.groups for readers in self.by_input(group)]

    def _statistics_peaks(self, choice: Choice, tokens: int) -> tuple[dict[str, int], dict[str, int]]:
        """The largest observe and compress parts over every group and layer, as streamer/block.py holds them: one
        statistic per distinct input (`by_input`), kept until the last layer reading it is compressed; the results
        of the layers compressed before stay until the block is written. Per layer, the inputs go last to first."""
        transient = self.forward_transient(choice.micro_batch)
        observe_peaks: list[dict[str, int]] = []
        compress_peaks: list[dict[str, int]] = []
        kept_before_group = 0
        for group in self.shapes.groups:
            inputs = self.by_input(group)
            order = list(reversed(inputs)) if choice.per_layer_statistics else inputs
            statistic = {readers: self.layers[readers[0]].statistic for readers in inputs}
            kept = kept_before_group
            for position, readers in enumerate(order):
                copy = tokens * max(self.layers[name].cost.update_bytes_per_token for name in readers)
                if choice.per_layer_statistics:
                    observe_peaks.append({"statistics": statistic[readers], "forward transients": transient,
                                          "statistic input copy": copy, KEPT_RESULTS: kept})
                for name in readers:
                    layer = self.layers[name]
                    waiting = statistic[readers] + (0 if choice.per_layer_statistics
                                                    else sum(statistic[later] for later in order[position + 1:]))
                    factored = 4 * layer.cost.factored**2 if self.on_gpu else 0  # CUDA's solvers copy their input
                    compress_peaks.append({
                        "statistics": waiting,
                        f"method working memory ({layer.linear.name})": layer.cost.working_bytes + factored,
                        KEPT_RESULTS: kept,
                    })
                    kept += layer.cost.kept_bytes
            if not choice.per_layer_statistics:
                observe_peaks.append({
                    "statistics": sum(statistic.values()), "forward transients": transient,
                    "statistic input copy": tokens * max(self.layers[name].cost.update_bytes_per_token
                                                         for name in group),
                    KEPT_RESULTS: kept_before_group,
                })
            kept_before_group = kept
        return max(observe_peaks, key=lambda p: sum(p.values())), max(compress_peaks, key=lambda p: sum(p.values()))

    def shortfall(self, phases: list[PhaseMemory]) -> str | None:
        """Why these phases do not fit the budget (None: they fit)."""
        for phase in (phase for phase in phases if phase.required):
            for pool, parts, available in (("device", phase.device, self.usable_device), ("host", phase.host,
                                                                                            self.budget.host)):
                needed = sum(parts.values())
                if needed > available:
                    largest = sorted(parts.items(), key=lambda item: -item[1])[:3]
                    return (f"{phase.name} needs {gib(needed)} of {pool} memory, {gib(available)} available "
                            f"(largest: {', '.join(f'{name} {gib(size)}' for name, size in largest)})")
        return None

    @property
    def usable_device(self) -> int:
        return int(self.budget.device * (1 - DEVICE_MARGIN))

    # ------------------------------------------------------------------ choice
    def candidates(
        self, micro_batch: int | None, activations: str | None, per_layer_statistics: bool | None
    ) -> list[Choice]:
        """Settings to try, best first: statistics of a group together (one forward for all), activations on the
        device, then the host, then disk; for each, the largest useful micro-batch down to 1. Given settings are
        kept as they are."""
        w = self.workload
        if per_layer_statistics is not None:
            statistics = [per_layer_statistics]
        else:
            observed = [readers for readers in self.observed_inputs() if self.layers[readers[0]].statistic]
            statistics = [False, True] if len(observed) > 1 else [False]
        if w.command == "gradients":  # every block's inputs are kept for the backward walk: always on disk
            places = ["disk"]
        elif activations:
            places = [activations]
        else:
            places = [p for p in ACTIVATION_PLACES if self.on_gpu or p != "device"]
        if micro_batch is not None:
            sizes = [micro_batch]
        else:
            largest = max(1, min(w.rank_windows, TOKENS_PER_FORWARD.get(self.device_type, 0) // w.seqlen))
            sizes = [2**k for k in range(largest.bit_length() - 1, -1, -1)]
        return [Choice(size, place, per_layer) for per_layer in statistics for place in places for size in sizes]

    def choose(
        self,
        micro_batch: int | None = None,
        activations: str | None = None,
        per_layer_statistics: bool | None = None,
    ) -> Plan:
        """The first candidate whose every phase fits; a run that cannot fit is refused with the reason."""
        reason = None
        for choice in self.candidates(micro_batch, activations, per_layer_statistics):
            phases = self.phases(choice)
            reason = self.shortfall(phases)
            if reason is None:
                return Plan(self, choice, phases)
        raise LayerpressError(f"the run cannot fit: {reason}, even with {choice.describe(self.device_type)}")


def plan_run(
    staged: StagedModel,
    workload: Workload,
    device_type: str,
    budget: Budget,
    process_bytes: int,
    true_sequential: bool = False,
    prefetch: bool = True,
    micro_batch: int | None = None,
    offload: bool = False,
    per_layer_statistics: bool = False,
) -> Plan:
    """The plan of a run: what `plan` prints and what `compress` takes its open settings from, made in one place.

    micro_batch, offload (activations on disk), per_layer_statistics: what the user fixed; the rest is chosen.
    """
    planner = Planner(ModelShapes.of(staged, true_sequential), workload, device_type, budget, process_bytes,
                      prefetch=prefetch)
    return planner.choose(
        micro_batch=micro_batch,
        activations="disk" if offload else None,
        per_layer_statistics=True if per_layer_statistics else None,
    )


# ---------------------------------------------------------------------- time
@dataclass(frozen=True)
class Speed:
    """Measured throughput of a machine, for the time estimate."""

    matmul: float  # FLOP/s of a matmul in a 16-bit compute dtype (probed: in the compute dtype), on the device
    matmul32: float  # FLOP/s of a float32 matmul, on the device (statistics, sweeps, a float32 forward)
    factor: float  # FLOP/s of a float32 Cholesky factorization, on the device
    op_latency: float  # seconds of one small operation on the device
    bandwidth: float  # bytes/s an elementwise operation moves on the device
    read: float  # bytes/s read from disk with a cold page cache
    write: float  # bytes/s written to disk and fsynced
    how: str = ""
    matmul_tf32: float = 0.0  # FLOP/s of a float32 matmul on TF32 tensor cores (0: none, as on a CPU)
    matmul_bf16: float = 0.0  # FLOP/s of a bfloat16 matmul accumulating in float32 (0: not known)
    interconnect: float | None = None  # bytes/s between two ranks of a torchrun job (None: DEFAULT_INTERCONNECT)

    def forward_rate(self, dtype: torch.dtype) -> float:
        """The block forward's matmul rate in compute `dtype`: float32 forwards run without TF32 (torch's default
        for matmuls), 16-bit ones at `matmul`."""
        return self.matmul32 if dtype == torch.float32 else self.matmul

    def statistic_rate(self, precision: str) -> float:
        """The rate of a statistic's products in `precision` (LayerCost.update_precision): TF32 or bfloat16 where
        they are known, else float32's (a CPU's TF32 is float32; an unknown bfloat16 rate is not assumed)."""
        rate = {"tf32": self.matmul_tf32, "bfloat16": self.matmul_bf16}.get(precision, 0.0)
        return rate or self.matmul32

    @classmethod
    def load(cls, path: Path) -> Speed:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise LayerpressError(f"cannot read throughput figures from {path}: {exc}") from exc

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))


def fastest_seconds(run: Callable[[], object], device: torch.device, repeats: int = 2) -> float:
    """The fastest of `repeats` timed runs, after a warm-up run (CUDA synchronized around each)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def _rate(
    make: Callable[[int], Callable[[], object]], flops: Callable[[int], float], device: torch.device
) -> tuple[float, int]:
    """The best FLOP/s of an operation over growing sizes (large matrices run faster), stopping at the first size
    that takes 0.2 s; returns the rate and the size that reached it. (Stopping at 0.05 s, a 2-core CPU stopped at
    2048² or 4096² from run to run, and the estimate for one OPT-66B-width block moved between 841 s and 1634 s
    against 948 s measured.)"""
    best, best_size = 0.0, 0
    for size in (256, 512, 1024, 2048, 4096):
        seconds = fastest_seconds(make(size), device)
        if flops(size) / seconds > best:
            best, best_size = flops(size) / seconds, size
        if seconds >= 0.2:
            break
    return best, best_size


def probe_speed(
    device: torch.device, dtype: torch.dtype, scratch: Path | None = None, precisions: Collection[str] = ()
) -> Speed:
    """Measure this machine: matmuls, a Cholesky, small ops and copies on the device, a file on disk (~5-10 s).

    precisions: the statistics' product precisions the plan times (LayerCost.update_precision): a bfloat16 matmul
    is probed for "bfloat16" (unless the compute dtype is bfloat16, already probed), a TF32 one on CUDA for "tf32"."""

    def matmul(kind: torch.dtype, tf32: bool = False) -> Callable[[int], Callable[[], object]]:
        def make(size: int) -> Callable[[], object]:
            a = torch.randn(size, size, device=device).to(kind)

            def run() -> torch.Tensor:
                with tf32_products(tf32):
                    return a @ a
            return run
        return make

    def cholesky(size: int) -> Callable[[], object]:
        a = torch.randn(size, size, device=device)
        spd = a @ a.T + size * torch.eye(size, device=device)
        return lambda: torch.linalg.cholesky(spd)

    matmul32_rate, matmul_size = _rate(matmul(torch.float32), lambda n: 2.0 * n**3, device)
    matmul_rate = matmul32_rate if dtype == torch.float32 else _rate(matmul(dtype), lambda n: 2.0 * n**3, device)[0]
    bf16_rate = matmul_rate if dtype == torch.bfloat16 else 0.0
    if not bf16_rate and "bfloat16" in precisions:
        bf16_rate = _rate(matmul(torch.bfloat16), lambda n: 2.0 * n**3, device)[0]
    tf32_rate = 0.0
    if device.type == "cuda" and "tf32" in precisions:
        tf32_rate = _rate(matmul(torch.float32, tf32=True), lambda n: 2.0 * n**3, device)[0]
    factor_rate, factor_size = _rate(cholesky, lambda n: n**3 / 3.0, device)
    small = torch.zeros(1024, device=device)
    latency = fastest_seconds(lambda: [small.add_(1.0) for _ in range(200)], device) / 200
    big = torch.zeros(2**25, device=device)
    copy = torch.empty_like(big)
    bandwidth = 2 * big.nbytes / fastest_seconds(lambda: copy.copy_(big), device)
    read, write, where = _disk_speed(scratch)
    kinds = dict.fromkeys([str(dtype).removeprefix("torch."), *(["bfloat16"] if bf16_rate else []),
                           *(["tf32"] if tf32_rate else [])])
    other = "".join(f" and {kind}" for kind in kinds if kind != "float32")
    how = (f"probed in this process on {device}: matmuls up to {matmul_size}² in float32{other}, Cholesky up to {factor_size}², 200 small ops, a 128 MiB copy; "
           f"disk: 64 MiB written to {where} with fsync, evicted from the page cache and read back")
    return Speed(matmul_rate, matmul32_rate, factor_rate, latency, bandwidth, read, write, how, tf32_rate, bf16_rate)


def _disk_speed(scratch: Path | None, size: int = 64 * 2**20) -> tuple[float, float, str]:
    directory = Path(scratch or tempfile.gettempdir())
    data = os.urandom(1 << 20) * (size >> 20)
    handle, name = tempfile.mkstemp(prefix="layerpress-probe-", dir=directory)
    try:
        started = time.perf_counter()
        os.write(handle, data)
        os.fsync(handle)
        write = size / (time.perf_counter() - started)
        os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)
        os.lseek(handle, 0, os.SEEK_SET)
        started = time.perf_counter()
        while os.read(handle, 1 << 24):
            pass
        read = size / (time.perf_counter() - started)
    finally:
        os.close(handle)
        os.unlink(name)
    return read, write, str(directory)


DEFAULT_INTERCONNECT = 1e9  # bytes/s: gloo over loopback TCP on one host, about what this project's machine moves


@dataclass(frozen=True)
class Estimate:
    """Seconds per block of each phase (one rank's under torchrun), and the run's total."""

    read: float
    compute: float
    write: float
    persist: float
    embed: float
    blocks: int
    prefetch: bool
    exchange: float = 0.0  # torchrun: statistics summed across ranks, results broadcast (not overlapped)
    persist_overlaps: bool = True  # one process saves the next inputs while the next block runs; torchrun's ranks
    # gather their paths first (streamer/stream.py)

    @property
    def per_block(self) -> float:
        hidden = self.persist if self.persist_overlaps else 0.0  # beside the compute, sharing the disk with writes
        serial = self.persist - hidden
        if self.prefetch:
            return max(self.read, self.compute + self.exchange, self.write + hidden) + serial
        return self.read + max(self.compute + self.exchange, hidden) + self.write + serial

    @property
    def total(self) -> float:
        return self.embed + self.blocks * self.per_block


def estimate_time(planner: Planner, choice: Choice, speed: Speed) -> Estimate:
    """Work counted from the shapes (forward and statistic flops, the methods' own counts) over measured rates."""
    s, w = planner.shapes, planner.workload
    tokens = w.rank_windows * w.seqlen  # one rank's (all of them in one process)
    forward = tokens * (2.0 * s.linear_parameters + 4.0 * w.seqlen * s.hidden)
    matmul = speed.forward_rate(s.dtype)
    seconds = forward / matmul  # propagate
    passes = 2 if w.structured else 1  # flap reads and writes every block in its pruning pass too
    if w.command == "gradients":  # the forward again with autograd, its backward (twice its work), and every
        # window's weight gradient of every layer (a forward's work), in float32
        seconds += 3 * forward / matmul + forward / speed.matmul32
    elif w.structured:
        seconds += forward / matmul  # the statistics pass observes the whole block
    elif w.method is not None:
        seconds += forward * _observed_fraction(planner, choice) / matmul
        if w.reconstructs:  # each step: a micro-batch's forward, and a backward of twice its work; the error
            # probe's windows twice (before and after)
            probed = min(w.rank_windows, math.ceil(PROBE_WINDOWS / choice.micro_batch) * choice.micro_batch)
            windows = w.reconstruction.steps * 3 * choice.micro_batch + 2 * probed
            seconds += windows * forward / w.rank_windows / matmul
        for readers in planner.observed_inputs():  # a statistic's updates, once for the layers sharing it
            cost = planner.layers[readers[0]].cost
            seconds += tokens * (cost.update_flops_per_token / speed.statistic_rate(cost.update_precision)
                                 + cost.update_moved_bytes_per_token / speed.bandwidth)
        solves = {}
        for name, layer in planner.layers.items():
            cost = layer.cost
            solves[name] = cost.matmul_flops / speed.matmul32 + cost.factor_flops / speed.factor \
                + cost.sequential_ops * speed.op_latency + cost.sequential_bytes / speed.bandwidth
        seconds += _slowest_rank(solves, w.world_size if w.command == "compress" else 1)
    buffer = planner.activation_buffer_bytes()
    writes = w.command == "compress"
    return Estimate(
        read=passes * s.block_stored_bytes / speed.read,
        compute=seconds,
        write=s.block_stored_bytes / speed.write if writes else 0.0,
        persist=buffer / speed.write if w.command != "eval" else 0.0,
        embed=s.pre_stage_bytes / speed.read + tokens * 2.0 * s.hidden / matmul,
        blocks=s.blocks,
        prefetch=planner.prefetch,
        exchange=_exchange_seconds(planner, speed),
        persist_overlaps=w.world_size == 1,
    )


def _slowest_rank(solves: dict[str, float], world_size: int) -> float:
    """The seconds of the most loaded rank when a block's layer solves are shared as the block loop shares them
    (streamer/block.py: costliest first, each to the least loaded rank)."""
    loads = [0.0] * world_size
    for name in sorted(solves, key=lambda name: -solves[name]):
        loads[loads.index(min(loads))] += solves[name]
    return max(loads)


def _exchange_seconds(planner: Planner, speed: Speed) -> float:
    """What a block's collectives take under torchrun: each statistic summed by a ring all-reduce (each rank sends
    2(N − 1)/N of its bytes), and compress's results (weight and mask) broadcast from the rank that solved them."""
    w = planner.workload
    if w.world_size == 1 or w.method is None:
        return 0.0
    share = 2 * (w.world_size - 1) / w.world_size
    moved = sum(share * layer.statistic for layer in planner.layers.values())
    if w.command == "compress":
        moved += sum(layer.linear.rows * layer.linear.columns * (planner.shapes.dtype.itemsize + 1)
                     for layer in planner.layers.values())
    return moved / (speed.interconnect or DEFAULT_INTERCONNECT)


def _observed_fraction(planner: Planner, choice: Choice) -> float:
    """Block forwards spent observing: each observation stops once its layers have their inputs, so it costs the
    share of the block's matmuls that come before the last of them (per layer: one observation per input)."""
    linears = planner.shapes.linears
    before, total = {}, 0.0
    for linear in linears:
        before[linear.name] = total
        total += linear.rows * linear.columns
    if choice.per_layer_statistics:
        return sum(max(before[name] for name in readers) for readers in planner.observed_inputs()) / total
    return sum(max(before[name] for name in group) for group in planner.shapes.groups) / total


# ---------------------------------------------------------------------- the plan
@dataclass
class Plan:
    planner: Planner
    choice: Choice
    phases: list[PhaseMemory]
    estimate: Estimate | None = None
    speed: Speed | None = None

    def with_estimate(self, speed: Speed) -> Plan:
        self.speed, self.estimate = speed, estimate_time(self.planner, self.choice, speed)
        return self

    @property
    def device_peak(self) -> int:
        """The highest device memory of the phases the run goes through (not the head of a later eval)."""
        return max(phase.device_peak for phase in self.phases if phase.required)

    @property
    def host_peak(self) -> int:
        """The highest host memory of the phases the run goes through (not the head of a later eval)."""
        return max(phase.host_peak for phase in self.phases if phase.required)

    def summary(self) -> str:
        """One line for compress's log."""
        pools = f"host peak {gib(self.host_peak)}"
        if self.planner.on_gpu:
            pools = f"device peak {gib(self.device_peak)}, " + pools
        return f"{self.choice.describe(self.planner.device_type, self.planner.observes)}; predicted {pools}"

    def describe(self) -> str:
        p, s, w = self.planner, self.planner.shapes, self.planner.workload
        what = [w.method.name if w.method is not None else "forward only"]
        if w.method is not None and not w.structured:
            what.append(f"{w.target.pattern[0]}:{w.target.pattern[1]}" if w.target.pattern
                        else f"{w.target.sparsity:.0%}")
            if w.target.quant is not None:
                what.append(f"{w.target.quant.bits}-bit" + (f" g{w.target.quant.groupsize}"
                                                            if w.target.quant.groupsize else ""))
        if w.reconstructs:
            what.append(f"+ reconstruct {','.join(w.reconstruction.subsets)}")
        budget = f"host {gib(p.budget.host)}"
        if p.on_gpu:
            budget = f"device {gib(p.budget.device)} ({gib(p.usable_device)} planned, {DEVICE_MARGIN:.0%} kept for "\
                     f"the allocator), " + budget
        buffer = p.activation_buffer_bytes()
        largest = max(p.layers.values(), key=lambda n: n.statistic + n.cost.working_bytes)
        data = "evaluation windows" if w.command == "eval" else "calibration"
        products = sorted({n.cost.update_precision for n in p.layers.values() if n.cost.update_flops_per_token})
        lines = [
            f"plan of {w.command}: {s.family}, {s.blocks} blocks, {' '.join(what)}, {w.nsamples} x {w.seqlen} {data}"
            + (f" ({w.rank_windows} windows per rank of {w.world_size}: every figure below is one rank's)"
               if w.world_size > 1 else "") + ", "
            f"on {p.device_type} in {str(s.dtype).removeprefix('torch.')}; {budget}",
            f"settings that fit: {self.choice.describe(p.device_type, p.observes)}"
            + (f"; statistics and solves in {str(p.statistic_dtype).removeprefix('torch.')}"
               if p.statistic_dtype else "")
            + (f" (the statistics' products in {', '.join(products)})" if products not in ([], ["float32"]) else ""),
            f"sizes: largest block {gib(s.block_bytes)} ({gib(s.block_stored_bytes)} stored), activation buffers "
            f"2 x {gib(buffer)}" + (f", largest layer {largest.linear.name} ({largest.linear.rows} x "
                                    f"{largest.linear.columns}): statistic {gib(largest.statistic)}, method working "
                                    f"memory {gib(largest.cost.working_bytes)}" if p.observes else "")
            + ("; prefetch: one block read ahead" if p.prefetch else "; no prefetch"),
            f"{'phase':10s} {'device peak':>12s} {'host peak':>10s}   largest parts",
        ]
        for phase in self.phases:
            parts = phase.device if p.on_gpu else phase.host
            top = ", ".join(f"{name} {gib(size)}" for name, size in sorted(parts.items(), key=lambda i: -i[1])[:4])
            device = gib(phase.device_peak) if p.on_gpu else "(host)"
            note = "" if phase.required else " (when the output is evaluated)"
            lines.append(f"{phase.name:10s} {device:>12s} {gib(phase.host_peak):>10s}   {top}{note}")
        if self.estimate is not None:
            e = self.estimate
            overlapped = (["read", "write"] if e.prefetch else []) + (["persist"] if e.persist_overlaps else [])
            overlap = f"{', '.join(overlapped)} overlapped with compute" if overlapped else "read, compute, write in turn"
            lines.append(
                f"time: about {e.total / 3600:.2f} h = {e.blocks} blocks x {e.per_block:.1f} s (per block: read "
                f"{e.read:.1f} s, compute {e.compute:.1f} s, write {e.write:.1f} s, persist inputs {e.persist:.1f} s"
                + (f", exchange between ranks {e.exchange:.1f} s at {gib(self.speed.interconnect or DEFAULT_INTERCONNECT)}"
                   "/s" if w.world_size > 1 else "") + f"; {overlap}) + embed {e.embed:.1f} s"
            )
            lines.append(f"throughput: {self.speed.how}")
        return "\n".join(lines)
