"""`plan COMMAND`: will a compress, scores, gradients or eval run fit, with which settings, and how long will it
take; nothing is read but headers (and, for eval without --windows, the evaluation text, to count its windows)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..data import capped_seqlen, evaluation_windows, load_text, load_tokenizer, tokenize
from ..model import StagedModel
from ..planner import Budget, Plan, Speed, Workload, plan_run, probe_speed, process_baseline


@dataclass
class PlanSettings:
    model: Path
    workload: Workload  # its seqlen as given; capped at the model's positions here
    seqlen: int
    device: torch.device
    budget: Budget
    dtype: torch.dtype | None = None
    true_sequential: bool = False
    prefetch: bool = True
    micro_batch: int | None = None
    offload: bool = False
    statistics_per_layer: bool = False
    speed: Path | None = None  # throughput measured elsewhere, instead of probing this machine
    save_speed: Path | None = None
    evaluation: tuple[str, int | None] | None = None  # eval: its text and --windows, to count the windows
    compress_router: bool = False  # a mixture of experts' router among the compressed layers


def plan(settings: PlanSettings) -> Plan:
    """The plan the command would make, with a time estimate where the device's throughput is known."""
    checkpoint = Checkpoint(settings.model)
    staged = StagedModel(checkpoint, torch.device("cpu"), settings.dtype, compress_router=settings.compress_router)
    seqlen = capped_seqlen(settings.seqlen, checkpoint.config)
    workload = replace(settings.workload, seqlen=seqlen)
    if settings.evaluation is not None:  # --windows bounds the count; without it, the text's windows are counted
        data, windows = settings.evaluation
        if windows is None:
            windows = len(evaluation_windows(tokenize(load_tokenizer(settings.model), load_text(data)), seqlen))
        workload = replace(workload, nsamples=windows)
    device_type = settings.device.type
    result = plan_run(
        staged, workload, device_type, settings.budget, process_baseline(device_type),
        true_sequential=settings.true_sequential, prefetch=settings.prefetch, micro_batch=settings.micro_batch,
        offload=settings.offload, per_layer_statistics=settings.statistics_per_layer,
    )
    if settings.speed is not None:
        result.with_estimate(Speed.load(settings.speed))
    elif device_type == "cpu" or torch.cuda.is_available():
        precisions = {layer.cost.update_precision for layer in result.planner.layers.values()}
        speed = probe_speed(settings.device, staged.dtype, precisions=precisions)
        if settings.save_speed is not None:
            speed.save(settings.save_speed)
        result.with_estimate(speed)
    return result
