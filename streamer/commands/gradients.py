"""`gradients`: per-weight gradient norms of the language-modelling loss, by a streamed backward pass.

GBLM-Pruner scores weights with ‖G_ij‖₂, the ℓ2 norm over calibration windows of each window's gradient of its
mean token loss. Whole-model autograd would hold every block at once; this pass holds one:

    forward   the shared block loop (streamer/stream.py); each block's inputs are kept in GRAD/.layerpress/
    head      final stage: loss of every window, its gradient with respect to the last block's outputs
    backward  for block L-1 .. 0: load it, recompute its forward from the kept inputs with autograd, one
              micro-batch at a time; backpropagate the output gradient; accumulate every compressible linear
              layer's squared per-window weight gradients; the input gradient is the previous block's output gradient
    write     GRAD/gradients-0000i.safetensors per block: ‖G‖₂ per weight, float32, under the model's weight names

Every phase is resumable: the forward through the shared loop's journal, the head and each backward block by a
journal record written once the block's norms and its input gradient are durable. Activations and gradients live in
memory-mapped files, so host RAM holds one block, one micro-batch and the accumulators.

Under torchrun each rank walks its share of the windows forward and back (its inputs and gradients in files of its
own); a window's squared gradient is its own, so the sums over windows add across ranks (an all-reduce per block,
the layers in sorted order), and rank 0 writes the norms and the journal. Every rank's input gradient is durable
before the all-reduce returns, and no rank overwrites a gradient slot before rank 0 has journaled the block that
made the other one current (a barrier): a rank killed at any moment resumes with the same command.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from methods import Target

from ..activations import ActivationBuffer, micro_batches
from ..data import Calibration, CalibrationOptions
from ..distributed import world
from ..errors import LayerpressError
from ..files import atomic_write_parts
from ..gradient_norms import COMMAND, gradients_file, weight_name
from ..journal import Run
from ..model import StagedModel
from ..stream import BlockContext, StreamOptions, open_calibrated, stream_blocks
from ..writer import safetensors_parts
from ..planner import Workload
from .lifecycle import RunRequest
from .planning import PlanChoices, plan_pass

log = logging.getLogger("layerpress")

HEAD_POSITIONS = 64


@dataclass
class GradientSettings:
    model: Path
    out: Path
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    dtype: torch.dtype | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    micro_batch: int | None = None  # None: the largest the memory plan fits (`compute_gradients` fills it in)
    restart: bool = False
    prefetch: bool = True
    planning: PlanChoices = field(default_factory=PlanChoices)

    def record(self, calibration: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """Everything that changes the gradients: kept in the journal, so that a resumed run must match it."""
        return {
            "calibration": calibration,
            "dtype": str(dtype).removeprefix("torch."),
            "device": self.device.type,
            "micro_batch": self.micro_batch,
        }


class SquaredGradients:
    """Σ over windows of (∂ loss_w / ∂W)² for one linear layer, in float32, while hooked to it.

    A window's weight gradient is Σ_t g_t x_tᵀ over its tokens (g: the gradient reaching the layer's output, x: its
    input), so it is formed per window from what the forward hook and the output's gradient hook see; this keeps
    windows of one micro-batch apart without a backward pass per window. `windows` must say how many windows the
    current micro-batch holds: a block may flatten them with their tokens (OPT's MLP does).
    """

    def __init__(self, layer: nn.Linear):
        self.sum = torch.zeros_like(layer.weight, dtype=torch.float32)
        self.windows = 1
        self._hook = layer.register_forward_hook(self._forward)

    def _forward(self, _: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs = args[0].detach()
        output.register_hook(lambda grad: self._add(inputs, grad))

    def _add(self, inputs: torch.Tensor, grad: torch.Tensor) -> None:
        """One window at a time, squared in place into the sum: one rows × columns product exists, whatever the
        micro-batch (a whole micro-batch's would be micro-batch × 3.3 GB for BLOOM-176B's dense_4h_to_h)."""
        grads = grad.reshape(self.windows, -1, grad.shape[-1])
        inputs = inputs.reshape(self.windows, -1, inputs.shape[-1])
        for window in range(self.windows):
            product = grads[window].float().T @ inputs[window].float()
            self.sum.addcmul_(product, product)

    def remove(self) -> None:
        self._hook.remove()


def head_loss(logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, windows: torch.Tensor) -> float:
    """Σ over windows and tokens of the next-token NLL, backpropagated into `hidden.grad`; returns the sum.

    The head runs on HEAD_POSITIONS positions at a time (its modules act on each position alone), so the logits of
    a window (seqlen × vocabulary floats, and as much again for their gradient) never exist whole.
    """
    total = 0.0
    for start in range(0, windows.shape[1] - 1, HEAD_POSITIONS):
        stop = min(start + HEAD_POSITIONS, windows.shape[1] - 1)
        with torch.enable_grad():
            logits = logits_of(hidden[:, start:stop]).float()
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), windows[:, start + 1 : stop + 1].reshape(-1), reduction="sum"
            )
            loss.backward()
        total += loss.item()
    return total


class GradientPass:
    """The state of one gradient pass over a checkpoint: its journal, activation files and calibration windows.

    Gradients flow for the *summed* token loss of each window (O(1) per token, so half precision does not
    underflow); the squared sums are divided by the number of predicted tokens squared at the end, giving the
    gradients of each window's mean token loss, as `model(ids, labels=ids).loss.backward()` would.
    """

    def __init__(self, settings: GradientSettings, staged: StagedModel, calibration: Calibration, run: Run):
        self.settings, self.staged, self.run = settings, staged, run
        self.ranks = world()
        self.all_windows = calibration.windows
        self.windows = self.all_windows[self.ranks.share(len(self.all_windows))]  # this rank's (all, in one process)
        self.shape = (*self.windows.shape, staged.config.hidden_size)
        self.batches = micro_batches(len(self.windows), max(1, settings.micro_batch))
        self.device = settings.device
        self.own = self.ranks.own(run.work)  # this rank's gradient files (the work directory itself in one process)
        self.own.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- files
    def inputs_path(self, block: int) -> Path:
        return self.run.persisted_inputs_path(block)

    def gradient_path(self, slot: int) -> Path:
        return self.own / f"gradient-{slot}.bin"

    def existing(self, path: Path, dtype: torch.dtype) -> ActivationBuffer:
        """A memory-mapped buffer over a file an earlier phase wrote (a missing one means a damaged run)."""
        if not path.is_file():
            raise LayerpressError(
                f"{self.settings.out}: {path.name} is missing, the gradient pass cannot go on; add --restart"
            )
        return ActivationBuffer(self.shape, dtype, path)

    def remove_buffers(self) -> None:
        """Once the norms are written, nothing else in the work directory is needed (a kill may have left some)."""
        shutil.rmtree(self.run.work / "stream", ignore_errors=True)
        for path in (*self.own.glob("gradient-*.bin"), *self.run.work.glob("inputs-*.bin")):
            path.unlink(missing_ok=True)  # under torchrun rank 0 may have removed another rank's inputs already
        if self.own != self.run.work:
            self.own.rmdir()

    # ---------------------------------------------------------------- phases
    def run_all(self) -> None:
        started = time.perf_counter()
        if "backward" not in self.run.body:
            if self.run.blocks_done < self.staged.num_blocks:
                self.forward()
            self.head()
        self.backward()
        self.run.finish({"seconds": time.perf_counter() - started, "bytes_read": self.staged.checkpoint.bytes_read})
        self.ranks.barrier()  # every rank is done with its files
        self.remove_buffers()
        log.info("wrote gradient norms of %d blocks to %s", self.staged.num_blocks, self.settings.out)

    def forward(self) -> None:
        """The shared block loop, keeping each block's inputs for the backward walk."""

        def keep_inputs(context: BlockContext) -> dict[str, Any]:
            path = self.inputs_path(context.index)
            if not path.is_file():  # saved atomically: present means complete
                context.acts.inputs.save(path)
            return {}

        options = StreamOptions(self.device, self.settings.micro_batch, offload_dir=self.run.work / "stream",
                                prefetch=self.settings.prefetch)
        stream_blocks(self.staged, self.all_windows, options, keep_inputs, self.run, desc="gradients: forward")

    def head(self) -> None:
        """Loss at the head; its gradient with respect to the last block's outputs goes to gradient slot 0."""
        hidden = self.existing(self.run.inputs_file, self.staged.dtype)
        gradient = ActivationBuffer(self.shape, torch.float32, self.gradient_path(0))
        clock, loss = time.perf_counter(), 0.0
        with self.staged.final_stage() as logits_of:
            for batch in self.batches:
                inputs = hidden.data[batch].to(self.device).requires_grad_()
                loss += head_loss(logits_of, inputs, self.windows[batch].to(self.device))
                gradient.data[batch] = inputs.grad.float().cpu()
        gradient.flush()
        loss = self.ranks.total(torch.tensor(loss, dtype=torch.float64)).item()  # returns once every rank's is durable
        mean_loss = loss / self.all_windows[:, 1:].numel()
        log.info("calibration loss %.4f (perplexity %.2f)", mean_loss, math.exp(mean_loss))
        self.run.record(
            {"backward": {"blocks_done": 0, "gradient_slot": 0}, "loss": mean_loss},
            {"block": "head", "head": time.perf_counter() - clock},
        )
        self.ranks.barrier()

    def backward(self) -> None:
        total = self.staged.num_blocks
        done = self.run.body["backward"]["blocks_done"]
        with self.staged.pre_stage() as embedder:
            sizes = {batch.stop - batch.start for batch in self.batches}
            extras = {size: embedder.extras(size, self.windows.shape[1]) for size in sizes}
        bar = tqdm(total=total, initial=done, desc="gradients: backward", unit="block", disable=None)
        for index in reversed(range(total - done)):
            clock = time.perf_counter()
            slot = self.run.body["backward"]["gradient_slot"]  # holds the gradient of this block's outputs
            output_gradient = self.existing(self.gradient_path(slot), torch.float32)
            norms = self.backward_block(index, extras, output_gradient, self.gradient_path(1 - slot))
            files = {}
            if self.ranks.is_writer:
                files[str(index)] = atomic_write_parts(gradients_file(self.settings.out, index),
                                                       safetensors_parts(norms))
            del norms
            self.run.record(
                {"backward": {"blocks_done": total - index, "gradient_slot": 1 - slot}, "files": files},
                {"block": index, "backward": time.perf_counter() - clock},
            )
            self.ranks.barrier()  # the block is journaled before any rank writes into the slot it read
            self.inputs_path(index).unlink(missing_ok=True)  # disk use shrinks as the walk goes back
            log.info("block %d/%d: gradients in %.2fs", index + 1, total, time.perf_counter() - clock)
            bar.update(1)
        bar.close()

    def backward_block(
        self, index: int, extras: dict, output_gradient: ActivationBuffer, input_gradient_path: Path
    ) -> dict[str, torch.Tensor]:
        """Block `index`'s weight-gradient norms; its input gradient goes to `input_gradient_path`."""
        inputs = self.existing(self.inputs_path(index), self.staged.dtype)
        input_gradient = ActivationBuffer(self.shape, torch.float32, input_gradient_path)
        block = self.staged.load_block(index)
        accumulators = {name: SquaredGradients(layer) for name, layer in self.staged.linears(block).items()}
        try:
            for batch in self.batches:
                size = batch.stop - batch.start
                for accumulator in accumulators.values():
                    accumulator.windows = size
                hidden = inputs.data[batch].to(self.device).requires_grad_()
                with torch.enable_grad():
                    output = self.staged.call_block(block, hidden, extras[size][index])
                    output.backward(output_gradient.data[batch].to(device=self.device, dtype=output.dtype))
                input_gradient.data[batch] = hidden.grad.float().cpu()
        finally:
            for accumulator in accumulators.values():
                accumulator.remove()
        input_gradient.flush()
        self.staged.release_block(index)
        for name in sorted(accumulators):  # every rank's windows (after this rank's input gradient is durable)
            self.ranks.total(accumulators[name].sum)
        tokens = self.windows.shape[1] - 1  # predicted tokens per window: back from summed to mean token loss
        return {  # in place: the norms are the sums' own memory
            weight_name(self.staged, index, name): accumulator.sum.sqrt_().div_(tokens).cpu()
            for name, accumulator in accumulators.items()
        }


def compute_gradients(settings: GradientSettings) -> Path:
    """Write the gradient norms of `settings.model` into `settings.out`; resumes a partial run of the same settings."""
    request = RunRequest(COMMAND, settings.out, settings.model, settings.restart)
    calibrated = open_calibrated(settings.model, settings.calibration, settings.device, settings.dtype)
    staged = calibrated.staged
    workload = Workload(None, Target(), settings.calibration.nsamples, calibrated.seqlen, command=COMMAND,
                        world_size=world().size)
    stream = StreamOptions(settings.device, prefetch=settings.prefetch)
    choices = replace(settings.planning, micro_batch=settings.micro_batch)
    plan = plan_pass(staged, workload, stream, choices, settings.out, settings.restart)
    settings = replace(settings, micro_batch=plan.choice.micro_batch)
    request.execute(
        settings.record(calibrated.calibration.record, staged.dtype), calibrated.fingerprints, staged.num_blocks,
        lambda run: GradientPass(settings, staged, calibrated.calibration, run).run_all(),
    )
    return settings.out
