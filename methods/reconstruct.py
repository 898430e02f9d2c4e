"""Layer-wise reconstruction (PERP, Zimmer et al., 2023): after a block is pruned, train a tiny subset of its
parameters so that its outputs match the dense block's on the same inputs, then merge the result into the weights.

Subsets (any combination, except that one weight update per matrix is allowed):
- biases: every linear layer's bias (the staged model gives bias-less layers zero biases where the family allows);
- norms: the LayerNorm/RMSNorm weights and biases;
- masklora: W + s·(B A ⊙ M), M = (W ≠ 0): the update never touches a pruned weight, so every zero is kept;
- scalelora: W ⊙ (B A) with B A = 1 at the start: a multiplicative update, zeros stay zeros;
- lora: W + s·B A, the plain low-rank update; merging it fills the pruned weights in (a warning says so).

Only float32 copies are trained (the block keeps its dtype); they are attached as `torch.nn.utils.parametrize`
parametrizations, so the block's own forward runs unchanged, and merged by removing them. After the merge the
zeros of every weight that masklora or scalelora touched are checked against the zeros it had before.
Everything random (LoRA initialisation, the order of the micro-batches) comes from the generator passed in.
"""

from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

SUBSETS = ("biases", "norms", "masklora", "scalelora", "lora")
WEIGHT_SUBSETS = ("masklora", "scalelora", "lora")
# Windows the reported before/after errors are measured on (the leading micro-batches that hold them; a full pass
# costs too much). Two micro-batches were too few: at micro-batch 1 on SmolLM2 (SparseGPT 70%, PERP's settings)
# the twelfth block's first two windows went 1.79 -> 3.03 while its mean over all 32 went 4.40 -> 3.54 (-20%;
# 15 windows worse, 17 better: one block's windows differ 70x in error, and training trades them).
PROBE_WINDOWS = 8


@dataclass(frozen=True)
class Reconstruction:
    """What to train after pruning a block, and how.

    subsets: see the module docstring; steps: optimizer steps (one micro-batch each) per block; lr: peak AdamW
    learning rate, reached after `warmup` (a fraction of the steps) and decayed linearly to zero; rank, alpha: the
    LoRA rank and scale (s = alpha / rank); weight_decay: AdamW's decoupled weight decay.
    """

    subsets: tuple[str, ...] = ()
    steps: int = 32
    lr: float = 1e-2
    warmup: float = 0.1
    rank: int = 16
    alpha: float = 16.0
    weight_decay: float = 0.0

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--reconstruct", type=parse_subsets, default=(), metavar="SUBSETS",
            help="after pruning each block, train these parameters so its outputs match the dense block's "
            f"(comma-separated: {', '.join(SUBSETS)}; lora fills pruned weights in) (default: none)",
        )
        parser.add_argument("--recon-steps", type=int, default=cls.steps,
                            help="reconstruction: optimizer steps per block, one micro-batch each "
                            f"(default: {cls.steps})")
        parser.add_argument("--recon-lr", type=float, default=cls.lr,
                            help=f"reconstruction: peak AdamW learning rate (default: {cls.lr})")
        parser.add_argument("--recon-warmup", type=float, default=cls.warmup,
                            help="reconstruction: fraction of the steps with a linearly rising learning rate, "
                            f"then linear decay to zero (default: {cls.warmup})")
        parser.add_argument("--lora-rank", type=int, default=cls.rank,
                            help=f"reconstruction: rank of masklora/scalelora/lora updates (default: {cls.rank})")
        parser.add_argument("--lora-alpha", type=float, default=cls.alpha,
                            help=f"reconstruction: masklora/lora scale alpha; s = alpha / rank (default: {cls.alpha})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Reconstruction":
        return cls(subsets=args.reconstruct, steps=args.recon_steps, lr=args.recon_lr, warmup=args.recon_warmup,
                   rank=args.lora_rank, alpha=args.lora_alpha)

    def __post_init__(self) -> None:
        unknown = [name for name in self.subsets if name not in SUBSETS]
        if unknown:
            raise ValueError(f"unknown reconstruction subset(s) {', '.join(unknown)}; choose from {', '.join(SUBSETS)}")
        updates = [name for name in self.subsets if name in WEIGHT_SUBSETS]
        if len(updates) > 1:
            raise ValueError(f"choose one weight update, not {' and '.join(updates)}")
        if self.steps < 1 or self.lr <= 0 or self.rank < 1 or not 0 <= self.warmup < 1 or self.weight_decay < 0:
            raise ValueError("reconstruction needs steps >= 1, lr > 0, rank >= 1, 0 <= warmup < 1, weight decay >= 0")
        if "lora" in self.subsets:
            warnings.warn("plain lora merges a dense update: the pruned weights become non-zero and the output is "
                          "no longer sparse (masklora and scalelora keep every zero)", stacklevel=2)

    @property
    def enabled(self) -> bool:
        return bool(self.subsets)

    @property
    def weight_update(self) -> str | None:
        return next((name for name in self.subsets if name in WEIGHT_SUBSETS), None)

    def settings(self) -> dict:
        """Everything that changes the result (for the output record and the resume fingerprint)."""
        record = asdict(self)
        record["subsets"] = list(self.subsets)
        if self.weight_update is None:
            del record["rank"], record["alpha"]
        return record


def parse_subsets(text: str) -> tuple[str, ...]:
    """'biases,norms,masklora' -> ('biases', 'norms', 'masklora') (order kept, duplicates dropped)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUBSETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown subset(s) {', '.join(unknown)}; choose from {', '.join(SUBSETS)}")
    return tuple(dict.fromkeys(names))


@dataclass
class ReconstructionReport:
    """trained: parameters trained (LoRA factors counted, not the weights they change); total: the block's
    parameters; loss_before / loss_after: mean squared error against the dense outputs on the first PROBE_WINDOWS
    windows, before training and after merging."""

    trained: int
    total: int
    loss_before: float
    loss_after: float


# ---------------------------------------------------------------- parametrizations
class _Master(nn.Module):
    """A float32 trainable copy of a small tensor (a bias or norm weight), cast to the tensor's dtype."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.value = nn.Parameter(tensor.detach().float().clone())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.value.to(original.dtype)


class _LowRank(nn.Module):
    """A rank-r pair B (out x r), A (r x in) in float32, combined with the frozen weight by `combine`."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator):
        super().__init__()
        rows, columns = weight.shape
        bound = 1 / math.sqrt(columns)  # LoRA's kaiming-uniform bound for A
        noise = (torch.rand(rank, columns, generator=generator, device="cpu") * 2 - 1) * bound  # the host's generator
        self.A = nn.Parameter(noise.to(weight.device))
        self.B = nn.Parameter(torch.zeros(rows, rank, device=weight.device))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.combine(original.float(), self.B @ self.A).to(original.dtype)

    def combine(self, weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _LoRA(_LowRank):
    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator, scale: float):
        super().__init__(weight, rank, generator)
        self.scale = scale

    def combine(self, weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * update


class _MaskLoRA(_LoRA):
    def combine(self, weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * update * (weight != 0)


class _ScaleLoRA(_LowRank):
    """W ⊙ (B A) with B A = 1 at the start. PERP starts from B = A = 1/√r, but then every rank component gets the
    same gradient and the update stays rank 1; adding noise to A that sums to zero over the rank breaks the tie and
    keeps B A = 1."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator):
        super().__init__(weight, rank, generator)
        with torch.no_grad():
            self.A -= self.A.mean(dim=0, keepdim=True)
            self.A += 1 / math.sqrt(rank)
            self.B.fill_(1 / math.sqrt(rank))

    def combine(self, weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return weight * update


def _weight_parametrization(settings: Reconstruction, weight: torch.Tensor, generator: torch.Generator) -> nn.Module:
    scale = settings.alpha / settings.rank
    if settings.weight_update == "masklora":
        return _MaskLoRA(weight, settings.rank, generator, scale)
    if settings.weight_update == "scalelora":
        return _ScaleLoRA(weight, settings.rank, generator)
    return _LoRA(weight, settings.rank, generator, scale)


# ---------------------------------------------------------------- attach, train, merge
def _targets(
    linears: dict[str, nn.Linear], norms: dict[str, nn.Module], settings: Reconstruction
) -> list[tuple[nn.Module, str]]:
    """(module, tensor name) of every tensor the chosen subsets train."""
    targets = []
    if "biases" in settings.subsets:
        targets += [(layer, "bias") for layer in linears.values() if layer.bias is not None]
    if "norms" in settings.subsets:
        targets += [(norm, name) for norm in norms.values() for name, _ in norm.named_parameters(recurse=False)]
    if settings.weight_update is not None:
        targets += [(layer, "weight") for layer in linears.values()]
    return targets


def _attach(
    targets: list[tuple[nn.Module, str]], settings: Reconstruction, generator: torch.Generator
) -> list[nn.Parameter]:
    trainable = []
    for module, name in targets:
        tensor = getattr(module, name)
        if name == "weight" and isinstance(module, nn.Linear):
            parametrization = _weight_parametrization(settings, tensor, generator)
        else:
            parametrization = _Master(tensor)
        parametrize.register_parametrization(module, name, parametrization)
        trainable += list(parametrization.parameters())
    return trainable


def _merge(targets: list[tuple[nn.Module, str]], keep_zeros: bool) -> None:
    """Write the trained values into the tensors; with keep_zeros, a linear weight whose zeros are not exactly the
    old ones is an error (and is left as it was)."""
    for module, name in targets:
        original = module.parametrizations[name].original
        merged = getattr(module, name)
        if not torch.isfinite(merged).all():
            raise ValueError(f"reconstruction produced non-finite values in a {type(module).__name__}.{name}")
        # only a linear weight's zeros are a mask: a norm's may be trained values (Gemma's scale by 1 + weight)
        if keep_zeros and name == "weight" and isinstance(module, nn.Linear):
            pruned = original == 0
            before, after = int(pruned.sum()), int((merged == 0).sum())
            if after != before or merged[pruned].any():
                raise ValueError(f"merging changed the zeros of a pruned weight ({before} zeros before, {after} after)")
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        original.copy_(merged)


def _detach(targets: list[tuple[nn.Module, str]]) -> None:
    """Drop the parametrizations without merging (after a failure), restoring the tensors as they were."""
    for module, name in targets:
        if parametrize.is_parametrized(module, name):
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)


def schedule(settings: Reconstruction) -> Callable[[int], float]:
    """The learning-rate factor of each step: linear warm-up to 1, then linear decay (still > 0 at the last step)."""
    warmup = round(settings.warmup * settings.steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return (settings.steps - step) / (settings.steps - warmup)

    return factor


def batch_order(count: int, steps: int, generator: torch.Generator) -> list[int]:
    """The micro-batch of every step: shuffled epochs over all micro-batches, as many as the steps need."""
    order: list[int] = []
    while len(order) < steps:
        order += torch.randperm(count, generator=generator, device="cpu").tolist()  # host indices, host generator
    return order[:steps]


Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (inputs, targets) micro-batches on the block's device


def probe_loss(run_block: Callable[[torch.Tensor], torch.Tensor], batches: Batches) -> float:
    """Mean squared error of the block's outputs against the targets, averaged over the leading micro-batches that
    hold PROBE_WINDOWS windows (all of them when there are fewer), fetched one at a time as training fetches them
    (on a GPU with activations in host memory each is a copy)."""
    total, windows, probed = 0.0, 0, 0
    with torch.no_grad():
        while probed < len(batches) and windows < PROBE_WINDOWS:
            inputs, targets = batches[probed]
            total += nn.functional.mse_loss(run_block(inputs).float(), targets.float()).item()
            windows, probed = windows + inputs.shape[0], probed + 1
    return total / probed


def reconstruct(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    norms: dict[str, nn.Module],
    run_block: Callable[[torch.Tensor], torch.Tensor],
    batches: Batches,
    settings: Reconstruction,
    generator: torch.Generator,
    average_gradients: Callable[[list[torch.Tensor]], None] | None = None,
) -> ReconstructionReport:
    """Train the chosen subsets of `block` (whose `linears` are pruned) so that run_block(inputs) ≈ targets over
    the (inputs, targets) micro-batches, then merge them into the block in place.

    average_gradients: replaces each step's gradients, in place, by their mean over the other trainings that run
    in step with this one on other micro-batches of the same block (None: this training alone)."""
    total = sum(parameter.numel() for parameter in block.parameters())
    targets = _targets(linears, norms, settings)
    if not batches or not targets:
        return ReconstructionReport(0, total, float("nan"), float("nan"))
    loss_before = probe_loss(run_block, batches)
    try:
        trainable = _attach(targets, settings, generator)
        optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(settings))
        with torch.enable_grad():
            for index in batch_order(len(batches), settings.steps, generator):
                inputs, outputs = batches[index]
                loss = nn.functional.mse_loss(run_block(inputs).float(), outputs.float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if average_gradients is not None:
                    average_gradients([parameter.grad for parameter in trainable if parameter.grad is not None])
                optimizer.step()
                scheduler.step()
        with torch.no_grad():
            _merge(targets, keep_zeros=settings.weight_update != "lora")
    finally:
        _detach(targets)
    trained = sum(parameter.numel() for parameter in trainable)
    return ReconstructionReport(trained, total, loss_before, probe_loss(run_block, batches))
