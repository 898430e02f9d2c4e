"""The block loop every streaming command shares: embed once, then read, process, propagate, release each block.

A command (compress, eval, a statistics pass) supplies only what it does to a block while the block is on the
device (for compress: streamer/block.py). The loop owns the order of the phases, the activations and, when given a
Run, resumability: after each block the next block's inputs are saved (on a thread, while the next block runs) and
the journal records the block as done once they are durable, so a killed run picks up at the first unrecorded block
with bit-identical inputs.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from .activations import Activations
from .data import Calibration, CalibrationOptions
from .decoded import open_checkpoint
from .distributed import world
from .errors import LayerpressError
from .failpoints import failpoint
from .journal import Run
from .model import BlockExtras, StagedModel
from .planner import gib

log = logging.getLogger("layerpress")


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
    add_biases: bool = False, compress_router: bool = False,
) -> Calibrated:
    """Read the checkpoint's headers, build its staged model and cut the calibration windows (seqlen capped).
    add_biases, compress_router: see StagedModel."""
    checkpoint = open_checkpoint(model)
    staged = StagedModel(checkpoint, device, dtype, add_biases=add_biases, compress_router=compress_router)
    loaded = calibration.load(model, checkpoint.config)
    return Calibrated(staged, loaded, {"checkpoint": checkpoint.fingerprint(), "calibration": loaded.fingerprint})


@dataclass
class StreamOptions:
    """device: where blocks run; micro_batch: windows per forward; offload_dir: activations in files there;
    prefetch: read block i + 1 from disk on a background thread while block i is processed."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    micro_batch: int = 1
    offload_dir: Path | None = None
    prefetch: bool = True
    activations_on_device: bool = False  # both activation buffers on `device` (the memory plan says when they fit)
    planned_device_peak: int | None = None  # what the memory plan predicts on a GPU, logged beside what it took


LOWER_MEMORY = "lower --micro-batch, add --statistics-per-layer or --offload-activations DIR"


class Phases:
    """Times the phases of one block, and shows the current one on the progress bar.

    On CUDA the clock is read after a synchronize (kernels run asynchronously: without it a phase's time is its
    launches', and the next phase pays for it). Running out of device memory in a phase becomes one line that names
    the pass, the block, the phase and the layer (`layer`, set by whoever compresses one), and what to lower.
    """

    def __init__(self, index: int, bar: tqdm, device: torch.device = torch.device("cpu"), desc: str = "blocks"):
        self.index, self.bar, self.device, self.desc = index, bar, device, desc
        self.seconds: dict[str, float] = {}
        self.layer: str | None = None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(f"block {self.index + 1}: {name}", refresh=True)
        self._synchronize()
        clock = time.perf_counter()
        try:
            yield
            self._synchronize()
        except torch.OutOfMemoryError as exc:
            where = f" ({self.layer})" if self.layer else ""
            raise LayerpressError(
                f"{self.desc}: out of {self.device.type} memory in block {self.index + 1}, phase {name}{where}: "
                f"{LOWER_MEMORY}; run the same command to resume (finished blocks are kept)"
            ) from exc
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - clock

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class BlockContext:
    """One block on the device, with its calibration inputs."""

    index: int
    block: nn.Module
    staged: StagedModel
    acts: Activations
    extras: dict[tuple[int, int], list[BlockExtras]]  # by micro-batch shape (windows, tokens): each block's
    device: torch.device
    phase: Phases
    propagated: bool = False  # the block's final outputs are stored already: the loop need not run it again

    def call(self, hidden: torch.Tensor) -> torch.Tensor:
        """The block's outputs for one micro-batch of hidden states on the device (autograd as the caller sets it)."""
        return self.staged.call_block(self.block, hidden, self.extras[tuple(hidden.shape[:2])][self.index])

    def forward(self, keep_outputs: bool = False) -> None:
        """Run every window through the block (keep_outputs: store the results in acts.outputs, which are the next
        block's inputs if `process` leaves the block unchanged afterwards: it may then set `propagated`, sparing
        the loop a second run)."""
        self.acts.run(self.call, self.device, keep_outputs=keep_outputs)

    def layer_name(self, linear: str) -> str:
        """The full module path of a linear layer of this block, as records and logs name it."""
        return self.staged.layer_name(self.index, linear)

    @property
    def linears(self) -> dict[str, nn.Linear]:
        return self.staged.linears(self.block)

    @property
    def norms(self) -> dict[str, nn.Module]:
        return self.staged.adapter.block_norms(self.block)


def stream_blocks(
    staged: StagedModel,
    windows: torch.Tensor,
    options: StreamOptions,
    process: Callable[[BlockContext], dict[str, Any]],
    run: Run | None = None,
    desc: str = "blocks",
    settle: Callable[[BlockContext], dict[str, Any]] | None = None,
    lengths: list[int] | None = None,
) -> Activations:
    """Pass `windows` through every block, calling `process` on each block before propagating through it.

    `process` may change the block (its changes are what the next block sees) and returns what the journal should
    record for the block. Until propagation overwrites it, `acts.outputs` is free for `process` to use (compress
    keeps the dense block's outputs there as reconstruction targets). Work `process` leaves running in the background
    (writing the block) overlaps propagation; `settle`, called after propagation and before the journal records the
    block, waits for it to be durable and returns more to record. Returns the activations, whose inputs are then the
    last block's outputs. `lengths`: the tokens of each right-padded window, longest first (see Activations);
    causal attention keeps the padding out of every real token's states.
    """
    ranks = world()
    share = ranks.share(len(windows))  # under torchrun this rank's windows only; all of them otherwise
    windows, lengths = windows[share], lengths[share] if lengths is not None else None
    offload_dir = ranks.own(options.offload_dir) if options.offload_dir is not None else None
    acts = Activations(
        len(windows), windows.shape[1], staged.config.hidden_size, staged.dtype, options.micro_batch,
        offload_dir, options.device if options.activations_on_device else None, lengths,
    )
    start = run.blocks_done if run is not None else 0
    with staged.pre_stage() as embedder:
        extras = {shape: embedder.extras(*shape) for shape in acts.batch_shapes()}
        if run is not None and run.inputs_file is not None:
            acts.inputs.load(run.inputs_file)
        else:
            for batch in acts.batches():
                tokens = slice(0, acts.length(batch))
                acts.inputs.data[batch, tokens] = embedder.embed(windows[batch, tokens])
    log.info(
        "%d windows of %d tokens ready%s; starting at block %d of %d%s", len(windows), windows.shape[1],
        f" on {ranks.describe()}" if ranks.distributed else "", start + 1, staged.num_blocks,
        " (resumed)" if start else "",
    )
    bar = tqdm(total=staged.num_blocks, initial=start, desc=desc, unit="block", disable=None)
    unrecorded: _Unrecorded | None = None  # the last block done, its next inputs still being saved
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerpress-prefetch") as reader, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerpress-persist") as saver:
        upcoming = reader.submit(staged.read_block, start) if options.prefetch and start < staged.num_blocks else None
        try:
            for index in range(start, staged.num_blocks):
                phase = Phases(index, bar, options.device, desc)
                with phase("read"):  # with prefetch: the time spent waiting for a read that ran during the last block
                    tensors = upcoming.result() if upcoming is not None else staged.read_block(index)
                    # a finished future keeps its result: drop it, or the last block's stored copy stays all block long
                    upcoming = reader.submit(staged.read_block, index + 1) \
                        if upcoming is not None and index + 1 < staged.num_blocks else None
                    block = staged.load_block(index, tensors)
                del tensors
                context = BlockContext(index, block, staged, acts, extras, options.device, phase)
                record = process(context)
                failpoint("before-propagate")
                if not context.propagated:
                    with phase("propagate"):
                        context.forward(keep_outputs=True)
                staged.release_block(index)
                if unrecorded is not None:  # the buffer it saves becomes the outputs at the swap
                    finished, unrecorded = unrecorded, None
                    with phase("persist"):  # here: waiting for the last block's save to end
                        finished.journal()
                acts.swap()
                inputs_file: Path | None = None  # saved here (torchrun), or being saved by `saving`
                saving: Future[Path] | None = None
                if run is not None and ranks.distributed:
                    with phase("persist"):  # every rank's inputs are durable once all have sent their path
                        inputs_file = _persist_inputs(acts, run, index + 1)
                        record = {**record, "rank_inputs": ranks.gather(str(inputs_file))}
                elif run is not None:  # saved while the next block is read and processed (which only reads them)
                    saving = saver.submit(_persist_inputs, acts, run, index + 1)
                if settle is not None:
                    record = {**record, **settle(context)}
                peak = _device_peak(options, index)
                if inputs_file is not None:
                    run.record_block(index, inputs_file, {**record, **peak}, phase.seconds)
                elif saving is not None:
                    unrecorded = _Unrecorded(run, index, saving, {**record, **peak}, phase.seconds)
                log.info(
                    "block %d/%d done: %s%s", index + 1, staged.num_blocks,
                    ", ".join(f"{name} {seconds:.2f}s" for name, seconds in phase.seconds.items()),
                    "".join(f"; device peak {gib(used['measured'])} (planned {gib(used['planned'] or 0)})"
                            for used in peak.get("device_peaks", {}).values()),
                )
                bar.update(1)
        except BaseException:
            if unrecorded is not None and unrecorded.saving.exception() is None:
                unrecorded.journal()  # finished work stays recorded: a resumed run starts after it
            raise
        if unrecorded is not None:
            unrecorded.journal()
    bar.close()
    return acts


@dataclass
class _Unrecorded:
    """A block done whose next block's inputs are still being saved: the journal records it once they are
    durable. Saving them while the next block runs hides the write and its fsync (SmolLM2, 32 x 512 windows: 19 MB,
    1.2 s of a 34 s run; a BLOOM-176B block's 128 x 2048 windows: 7.5 GB)."""

    run: Run
    index: int
    saving: Future[Path]
    record: dict[str, Any]
    timing: dict[str, float]

    def journal(self) -> None:
        self.run.record_block(self.index, self.saving.result(), self.record, self.timing)


def _device_peak(options: StreamOptions, index: int) -> dict[str, Any]:
    """On CUDA, the block's peak of allocated device memory beside the plan's (for the journal), and a fresh count
    for the next block; nothing elsewhere."""
    if options.device.type != "cuda":
        return {}
    measured = torch.cuda.max_memory_allocated(options.device)
    torch.cuda.reset_peak_memory_stats(options.device)
    return {"device_peaks": {str(index): {"measured": measured, "planned": options.planned_device_peak}}}


def remove_offloaded_activations(options: StreamOptions) -> None:
    """A finished pass no longer needs its --offload-activations files."""
    if options.offload_dir is not None:
        for i in (0, 1):
            (world().own(options.offload_dir) / f"activations-{i}.bin").unlink(missing_ok=True)


def _persist_inputs(acts: Activations, run: Run, block: int) -> Path:
    """Make the next block's inputs durable: flush the offload file, or save the RAM buffer under .layerpress/."""
    if acts.inputs.path is not None:
        acts.inputs.flush()
        return acts.inputs.path
    path = run.persisted_inputs_path(block)
    acts.inputs.save(path)
    return path


def walk_blocks(
    staged: StagedModel, process: Callable[[int, nn.Module], dict[str, Any]], run: Run, desc: str = "blocks"
) -> None:
    """Call `process` on every block not yet done, one block on the device at a time, without activations.

    For passes that need the weights only (structured pruning applies decisions already taken); journaled like
    `stream_blocks`, so a killed pass resumes at its first unfinished block.
    """
    start = run.blocks_done
    if start:
        log.info("resuming at block %d of %d", start + 1, staged.num_blocks)
    bar = tqdm(total=staged.num_blocks, initial=start, desc=desc, unit="block", disable=None)
    for index in range(start, staged.num_blocks):
        phase = Phases(index, bar, staged.device, desc)
        with phase("read"):
            block = staged.load_block(index)
        with phase(desc):
            record = process(index, block)
        staged.release_block(index)
        run.record_block(index, None, record, phase.seconds)
        bar.update(1)
    bar.close()
