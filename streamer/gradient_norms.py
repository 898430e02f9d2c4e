"""What `compress --method gblm --gradients GRAD` reads of a finished gradient pass (streamer/commands/gradients.py).

The pass writes GRAD/gradients-0000i.safetensors per block, ‖∂loss/∂W_ij‖₂ under the model's weight names, and
keeps every file's digest in its journal: a reader checks the pass against its own model and calibration windows
before it trusts a byte, and each file against its digest when it reads it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from .checkpoint import Checkpoint
from .data import Calibration
from .errors import LayerpressError
from .journal import describe_differences, read_journal
from .model import StagedModel
from .stream import BlockContext

COMMAND = "gradients"


def gradients_file(directory: Path, block: int) -> Path:
    return directory / f"gradients-{block:05d}.safetensors"


def weight_name(staged: StagedModel, block: int, linear: str) -> str:
    """How the gradient files name a linear layer's weight: its name in the model's state dict."""
    return f"{staged.block_prefix(block)}{linear}.weight"



class GradientNorms:
    """A finished gradient pass, checked against the model and calibration windows of the run that reads it."""

    def __init__(self, directory: Path, checkpoint: Checkpoint, calibration: Calibration):
        self.directory = directory
        body = read_journal(directory) if directory.is_dir() else None
        if body is None or body.get("command") != COMMAND:
            raise LayerpressError(f"{directory} holds no gradient pass: make one with `main.py gradients`")
        if body["state"] != "complete":
            raise LayerpressError(f"the gradient pass in {directory} is not finished: run it again to resume it")
        if body["fingerprints"]["checkpoint"] != checkpoint.fingerprint():
            raise LayerpressError(
                f"the gradients in {directory} were computed for another model than {checkpoint.directory}"
            )
        differences = describe_differences(body["settings"]["calibration"], calibration.record, "calibration ")
        if differences or body["fingerprints"]["calibration"] != calibration.fingerprint:
            raise LayerpressError(
                f"the gradients in {directory} were computed on other calibration windows "
                f"({'; '.join(differences) or 'calibration text changed'}): use the same --calib, --nsamples, "
                "--seqlen and --seed as the gradient pass"
            )
        self.digests: dict[str, str] = body.get("files", {})

    @property
    def fingerprint(self) -> str:
        """Identifies these gradients (the digests of their files), for the journal of the run that uses them."""
        return hashlib.sha256(repr(sorted(self.digests.items())).encode()).hexdigest()

    def for_block(self, context: BlockContext) -> dict[str, torch.Tensor]:
        """The norms of the block's linear layers by layer name, on the device (the file's digest checked first)."""
        path = gradients_file(self.directory, context.index)
        data = path.read_bytes() if path.is_file() else b""
        if hashlib.sha256(data).hexdigest() != self.digests.get(str(context.index)):
            raise LayerpressError(f"{path} is missing or damaged: run `main.py gradients` again with --restart")
        tensors = load_safetensors(data)
        norms = {}
        for name, layer in context.linears.items():
            norm = tensors.get(weight_name(context.staged, context.index, name))
            if norm is None or norm.shape != layer.weight.shape:
                raise LayerpressError(f"{path} holds no gradient norms of shape {tuple(layer.weight.shape)} for {name}")
            norms[name] = norm.to(layer.weight.device)
        return norms
