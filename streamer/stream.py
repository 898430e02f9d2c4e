"""The block loop every streaming command shares: embed once, then read, process, propagate, release each block.

A command (compress, eval, a statistics pass) supplies only what it does to a block while the block is on the
device. The loop owns the order of the phases, the activations and, when given a Run, resumability: after each
block the next block's inputs are made durable and the journal records the block as done, so a killed run picks
up at the first unfinished block with bit-identical inputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from methods.base import Statistic

from .activations import Activations
from .journal import Run
from .model import BlockExtras, StagedModel

log = logging.getLogger("layerpress")


@dataclass
class StreamOptions:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    micro_batch: int = 1
    offload_dir: Path | None = None


@dataclass
class BlockContext:
    """One block on the device, with its calibration inputs."""

    index: int
    block: nn.Module
    staged: StagedModel
    acts: Activations
    extras: dict[int, BlockExtras]
    device: torch.device
    timing: dict[str, float] = field(default_factory=dict)
    propagated: bool = False  # the block's final outputs are stored already: the loop need not run it again

    def forward(self, keep_outputs: bool = False) -> None:
        """Run every window through the block (keep_outputs: store the results as the next block's inputs, which
        a `process` that leaves the block unchanged may do while observing it, sparing the loop a second run)."""
        self.acts.run(
            lambda hidden: self.staged.call_block(self.block, hidden, self.extras[hidden.shape[0]]),
            self.device,
            keep_outputs=keep_outputs,
        )
        self.propagated = keep_outputs

    def layer_name(self, linear: str) -> str:
        """The full module path of a linear layer of this block, as records and logs name it."""
        return f"{self.staged.adapter.blocks}.{self.index}.{linear}"

    @property
    def linears(self) -> dict[str, nn.Linear]:
        return self.staged.linears(self.block)


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


def stream_blocks(
    staged: StagedModel,
    windows: torch.Tensor,
    options: StreamOptions,
    process: Callable[[BlockContext], dict[str, Any]],
    run: Run | None = None,
    desc: str = "blocks",
) -> Activations:
    """Pass `windows` through every block, calling `process` on each block before propagating through it.

    `process` may change the block (its changes are what the next block sees) and returns what the journal should
    record for the block. Returns the activations, whose inputs are then the last block's outputs.
    """
    acts = Activations(
        len(windows), windows.shape[1], staged.config.hidden_size, staged.dtype, options.micro_batch,
        options.offload_dir,
    )
    start = run.blocks_done if run is not None else 0
    with staged.pre_stage() as embedder:
        extras = {size: embedder.extras(size, windows.shape[1]) for size in acts.batch_sizes()}
        if run is not None and run.inputs_file is not None:
            acts.inputs.load(run.inputs_file)
        else:
            for batch in acts.batches():
                acts.inputs.data[batch] = embedder.embed(windows[batch]).cpu()
    if start:
        log.info("resuming at block %d of %d", start + 1, staged.num_blocks)
    bar = tqdm(total=staged.num_blocks, initial=start, desc=desc, unit="block", disable=None)
    for index in range(start, staged.num_blocks):
        clock = time.perf_counter()
        block = staged.load_block(index)
        context = BlockContext(index, block, staged, acts, extras, options.device)
        context.timing["read"] = time.perf_counter() - clock
        record = process(context)
        if not context.propagated:
            clock = time.perf_counter()
            context.forward(keep_outputs=True)
            context.timing["propagate"] = time.perf_counter() - clock
        staged.release_block(index)
        acts.swap()
        if run is not None:
            clock = time.perf_counter()
            inputs_file = _persist_inputs(acts, run, index + 1)
            context.timing["persist"] = time.perf_counter() - clock
            run.record_block(index, inputs_file, record, context.timing)
        log.debug("block %d: %s", index, context.timing)
        bar.update(1)
    bar.close()
    return acts


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
    for index in tqdm(range(start, staged.num_blocks), initial=start, total=staged.num_blocks, desc=desc,
                      unit="block", disable=None):
        clock = time.perf_counter()
        block = staged.load_block(index)
        timing = {"read": time.perf_counter() - clock}
        clock = time.perf_counter()
        record = process(index, block)
        timing[desc] = time.perf_counter() - clock
        staged.release_block(index)
        run.record_block(index, None, record, timing)
