"""`scores`: how much pruning would hurt each linear layer, measured in one streaming pass like compress.

    embed calibration windows ─► for each block: read ─► observe ─► score ─► (prune) ─► propagate ─► journal

Every linear layer gets the loss estimates of pruning it at each probe sparsity (one pass serves several: the
Hessian and its factor are shared) and OWL's outlier count (methods/scores.py); the allocations of
`compress --allocation score|owl` rank layers by them.

Inputs: by default each block is scored on the inputs the DENSE model gives it (`--inputs dense`). The scores then
describe the model itself rather than one pruning schedule, so one pass serves every allocation and target near the
probe, and OWL's outlier ratios are defined on the dense model. `--inputs pruned` prunes each block with SparseGPT at
the probe sparsity before propagating, as the seed paper's sequential pruning does: the scores then include the
errors of earlier blocks pruned uniformly.

Resumable like compress: the journal in OUT/.layerpress keeps each finished block's scores and the next block's
inputs; OUT/scores.json is written once all blocks are done.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from methods import Target
from methods.scores import LayerScore, Scorer
from methods.statistics import Gram

from ..allocation import SCORES_FILE
from ..block import (DEFAULT_EXPERT_MIN_TOKENS, check_expert_min_tokens, forward_until_observed, observe,
                     observe_starved_experts, statistic_readers)
from ..data import CalibrationOptions
from ..distributed import world
from ..errors import LayerpressError
from ..files import atomic_write
from ..journal import Run
from ..planner import Workload
from ..stream import BlockContext, StreamOptions, open_calibrated, remove_offloaded_activations, stream_blocks
from .lifecycle import RunRequest
from .planning import PlanChoices, plan_pass, planned_stream

log = logging.getLogger("layerpress")

INPUTS = ("dense", "pruned")


@dataclass
class ScoreSettings:
    model: Path
    out: Path
    scorer: Scorer
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    inputs: str = "dense"
    dtype: torch.dtype | None = None
    restart: bool = False
    stream: StreamOptions = field(default_factory=StreamOptions)  # as given; the plan fills in what is left open
    planning: PlanChoices = field(default_factory=PlanChoices)
    expert_min_tokens: int = DEFAULT_EXPERT_MIN_TOKENS  # mixture of experts: compress's rule (streamer/block.py)
    compress_router: bool = False  # mixture of experts: score the router too, for a compress that compresses it

    def __post_init__(self) -> None:
        check_expert_min_tokens(self.expert_min_tokens)
        if self.inputs not in INPUTS:
            raise LayerpressError(f"--inputs must be one of {', '.join(INPUTS)}, got {self.inputs!r}")
        if self.inputs == "pruned" and len(self.scorer.sparsities) != 1:
            raise LayerpressError("--inputs pruned prunes at the probe sparsity: give exactly one --sparsity")
        self.scorer = replace(self.scorer, keep_pruned=self.inputs == "pruned")

    def workload(self, seqlen: int) -> Workload:
        """The score pass as the memory planner sees it: a compress run that writes nothing."""
        return Workload(self.scorer, Target(sparsity=max(self.scorer.sparsities)), self.calibration.nsamples, seqlen,
                        command="scores", world_size=world().size)

    def record(self, calibration: dict[str, Any], dtype: torch.dtype, stream: StreamOptions,
               experts: bool = False) -> dict[str, Any]:
        """Everything that changes the scores: kept in the journal (resume must match) and in scores.json
        (experts: the model has a mixture of experts)."""
        return {
            "sparsities": list(self.scorer.sparsities),
            "inputs": self.inputs,
            "scorer": {"damping": self.scorer.damping, "blocksize": self.scorer.blocksize,
                       "outlier_threshold": self.scorer.outlier_threshold, "cca_noise": self.scorer.cca_noise,
                       # a float32 Gram leaves the record as it was before --gram-dtype reached scores
                       **({} if self.scorer.gram_dtype == "float32" else {"gram_dtype": self.scorer.gram_dtype})},
            "calibration": calibration,
            "dtype": str(dtype).removeprefix("torch."),
            "device": stream.device.type,
            "micro_batch": stream.micro_batch,
            **({"expert_min_tokens": self.expert_min_tokens} if experts else {}),
            **({"compress_router": True} if self.compress_router else {}),
        }


def score(settings: ScoreSettings) -> Path:
    """Score every linear layer of a checkpoint into `settings.out`/scores.json; resumes a partial run."""
    request = RunRequest("scores", settings.out, settings.model, settings.restart)
    calibrated = open_calibrated(settings.model, settings.calibration, settings.stream.device, settings.dtype,
                                 compress_router=settings.compress_router)
    staged = calibrated.staged
    plan = plan_pass(staged, settings.workload(calibrated.seqlen), settings.stream, settings.planning, settings.out,
                     settings.restart)
    stream = planned_stream(settings.stream, plan, settings.out)
    record = settings.record(calibrated.calibration.record, staged.dtype, stream, staged.adapter.experts is not None)
    per_layer = plan.choice.per_layer_statistics

    def work(run: Run) -> None:
        started = time.perf_counter()

        scored: dict[int, dict[str, dict[str, Any]]] = {}  # a block's layer records, until its output exists

        def process(context: BlockContext) -> dict[str, Any]:
            scored[context.index] = score_block(context, settings.scorer, per_layer, settings.expert_min_tokens)
            return {}

        def settle(context: BlockContext) -> dict[str, Any]:
            cmpq = block_sensitivity(context, settings.scorer)
            return {"layers": {name: {**record, "cmpq": cmpq} for name, record in scored.pop(context.index).items()}}

        stream_blocks(staged, calibrated.windows, stream, process, run, desc="scores", settle=settle)
        if not world().is_writer:
            return
        document = {"model": str(settings.model), **record, "layers": run.body["layers"]}
        atomic_write(settings.out / SCORES_FILE, json.dumps(document, indent=1).encode())
        run.finish({"seconds": time.perf_counter() - started})
        remove_offloaded_activations(stream)
        log.info("wrote %s", settings.out / SCORES_FILE)

    request.execute(record, calibrated.fingerprints, staged.num_blocks, work)
    return settings.out / SCORES_FILE


def block_sensitivity(context: BlockContext, scorer: Scorer) -> float:
    """CMPQ of a propagated block: the canonical correlations of its inputs (after the loop's swap, the outputs
    buffer) and its outputs (now the inputs buffer), micro-batch by micro-batch."""
    acts = context.acts
    correlation = scorer.block_correlation(acts.inputs.shape[-1], context.device)
    with context.phase("correlate"):
        for batch in acts.batches():
            correlation.update(acts.outputs.data[batch].to(context.device), acts.inputs.data[batch].to(context.device))
        world().combine({"block": correlation})  # under torchrun: every rank's windows
        return correlation.sensitivity()


def score_block(
    context: BlockContext, scorer: Scorer, per_layer_statistics: bool,
    expert_min_tokens: int = DEFAULT_EXPERT_MIN_TOKENS,
) -> dict[str, dict[str, Any]]:
    """Observe the block's layers on its inputs and score them; with the scorer's keep_pruned, leave them pruned at
    the probe once all are scored.

    per_layer_statistics: observe and score one input at a time (one Gram in memory instead of the block's); the
    weights change only after every layer is scored, so each layer sees the same inputs either way. Layers that
    read one input (q/k/v, gate/up) share its Gram. Experts routed fewer than `expert_min_tokens` tokens are
    scored on all of them, as compress observes them (observe_starved_experts)."""
    linears = context.linears
    ranks = world()  # under torchrun each rank's Grams become all ranks' sums; every rank then scores every layer
    scores: dict[str, LayerScore] = {}
    diagonals: dict[str, torch.Tensor] = {}  # diag H of each layer, for its Wanda scores

    def score(name: str, gram: Gram) -> None:
        context.phase.layer = context.layer_name(name)  # named if the device runs out of memory
        try:
            with context.phase("score"):
                scores[name] = scorer.score(linears[name], gram)
        except ValueError as exc:
            raise LayerpressError(f"scoring {context.layer_name(name)} failed: {exc}") from exc
        context.phase.layer = None
        diagonals[name] = gram.gram.diagonal() * gram.scale  # a vector: never the whole H

    adapter = context.staged.adapter

    def fresh(names: Sequence[str]) -> dict[str, Gram]:
        """A Gram for each layer of `names`, one object for the layers reading one input."""
        grams: dict[str, Gram] = {}
        for readers in statistic_readers(adapter, names, scorer.statistic_per_input):
            grams.update(dict.fromkeys(readers, scorer.statistic(linears[readers[0]])))
        return grams

    def observe_grams(names: Sequence[str], forward: Callable[[], None]) -> dict[str, Gram]:
        grams = fresh(names)
        with context.phase("observe"):
            tokens = observe(linears, grams, forward, stop_early=per_layer_statistics and adapter.experts is None)
            observe_starved_experts(context, grams, tokens, expert_min_tokens, fresh)  # compress's rule
            ranks.combine(grams)
        return grams

    if per_layer_statistics:
        for readers in statistic_readers(adapter, list(linears), scorer.statistic_per_input):
            grams = observe_grams(readers, forward_until_observed(context))
            for name in readers:
                score(name, grams.pop(name))
    else:
        grams = observe_grams(list(linears), context.forward)
        for name in linears:  # each Gram is dropped once its layer is scored
            score(name, grams.pop(name))
    outliers = scorer.outliers(linears, diagonals)
    records = {}
    for name, result in scores.items():
        result.outliers = outliers[name]
        if result.pruned is not None:
            linears[name].weight.data.copy_(result.pruned)
        records[context.layer_name(name)] = {"block": context.index, "linear": name, **result.record()}
    probe = scorer.sparsities[0]
    worst = max(scores, key=lambda name: scores[name].obs_loss[probe])
    log.info("block %d/%d scored: highest OBS loss at sparsity %g: %.4g (%s)", context.index + 1,
             context.staged.num_blocks, probe, scores[worst].obs_loss[probe], worst)
    return records
