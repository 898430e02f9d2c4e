"""The memory plan every command makes before it reads a byte, and the stream options it takes from the plan.

compress, scores, gradients and eval each describe their pass as a `Workload`; `plan_pass` plans it
(streamer/planner.py), logs what it chose, and refuses a run that cannot fit. What the user fixed (micro-batch,
statistics per layer, activations on disk) is kept; the rest comes from the plan. A resumed run keeps the
micro-batch it started with, which its recorded settings hold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from ..distributed import world
from ..journal import WORK_DIR, read_journal
from ..model import StagedModel
from ..planner import Budget, Plan, Workload, plan_run, process_baseline
from ..stream import StreamOptions

log = logging.getLogger("layerpress")


@dataclass(frozen=True)
class PlanChoices:
    """What the user fixed of a plan, and the memory it may use (None: the largest that fits; the machine's
    totals; the process's memory measured when planning)."""

    budget: Budget | None = None
    process_bytes: int | None = None
    micro_batch: int | None = None
    statistics_per_layer: bool = False


def plan_pass(
    staged: StagedModel,
    workload: Workload,
    stream: StreamOptions,
    choices: PlanChoices,
    out: Path | None = None,
    restart: bool = False,
    true_sequential: bool = False,
) -> Plan:
    """The plan of this pass over `staged` (out: the run's directory, whose partial run it may resume); refuses
    (LayerpressError) a pass that cannot fit."""
    device = stream.device
    plan = plan_run(
        staged, workload, device.type, choices.budget or Budget.of_machine(device),
        choices.process_bytes or process_baseline(device.type), true_sequential=true_sequential,
        prefetch=stream.prefetch, micro_batch=choices.micro_batch or recorded_micro_batch(out, restart),
        offload=stream.offload_dir is not None, per_layer_statistics=choices.statistics_per_layer,
    )
    log.info("plan of %s: %s", workload.command, plan.summary())
    available = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    if plan.host_peak > available:
        log.warning("the plan needs %.1f GiB of host memory, but only %.1f GiB is free now: the run may be killed",
                    plan.host_peak / 2**30, available / 2**30)
    return plan


def planned_stream(stream: StreamOptions, plan: Plan, out: Path | None) -> StreamOptions:
    """The stream options the pass uses: the user's, with the plan's micro-batch and activation place (activations
    the plan sends to disk go under OUT/.layerpress/activations unless the user named a directory). Under torchrun
    every rank takes rank 0's choice, so that the ranks' micro-batches agree run after run."""
    choice, offload_dir = world().broadcast(plan.choice, owner=0), stream.offload_dir  # rank 0's, on every rank
    if offload_dir is None and choice.activations == "disk" and out is not None:
        offload_dir = out / WORK_DIR / "activations"
    return replace(stream, micro_batch=choice.micro_batch, offload_dir=offload_dir,
                   activations_on_device=choice.activations == "device", planned_device_peak=plan.device_peak)


def recorded_micro_batch(out: Path | None, restart: bool) -> int | None:
    """The micro-batch of the partial run in `out` that this run resumes, if any."""
    if out is None or restart or not (out / WORK_DIR).is_dir():
        return None
    body = read_journal(out)
    return body["settings"].get("micro_batch") if body is not None else None
