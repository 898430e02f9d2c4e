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
from pathlib import Path
from typing import Any

import torch

from methods import Target
from methods.scores import LayerScore, Scorer
from methods.statistics import Gram

from ..allocation import SCORES_FILE
from ..block import forward_until_observed, observe, statistic_readers
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

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise LayerpressError(f"--inputs must be one of {', '.join(INPUTS)}, got {self.inputs!r}")
        if self.inputs == "pruned" and len(self.scorer.sparsities) != 1:
            raise LayerpressError("--inputs pruned prunes at the probe sparsity: give exactly one --sparsity")
        self.scorer = replace(self.scorer, keep_pruned=self.inputs == "pruned")

    def workload(self, seqlen: int) -> Workload:
        """The score pass as the memory planner sees it: a compress run that writes nothing."""
        return Workload(self.scorer, Target(sparsity=max(self.scorer.sparsities)), self.calibration.nsamples, seqlen,
                        command="scores", world_size=world().size)

    def record(self, calibration: dict[str, Any], dtype: torch.dtype, stream: StreamOptions) -> dict[str, Any]:
        """Everything that changes the scores: kept in the journal (resume must match) and in scores.json."""
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
        }


def score(settings: ScoreSettings) -> Path:
    """Score every linear layer of a checkpoint into `settings.out`/scores.json; resumes a partial run."""
    request = RunRequest("scores", settings.out, settings.model, settings.restart)
    calibrated = open_calibrated(settings.model, settings.calibration, settings.stream.device, settings.dtype)
    staged = calibrated.staged
    plan = plan_pass(staged, settings.workload(calibrated.seqlen), settings.stream, settings.planning, settings.out,
                     settings.restart)
    stream = planned_stream(settings.stream, plan, settings.out)
    record = settings.record(calibrated.calibration.record, staged.dtype, stream)
    per_layer = plan.choice.per_layer_statistics

    def work(run: Run) -> None:
        started = time.perf_counter()

        scored: dict[int, dict[str, dict[str, Any]]] = {}  # a block's layer records, until its output exists

        def process(context: BlockContext) -> dict[str, Any]:
            scored[context.index] = score_block(context, settings.scorer, per_layer)
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


def score_block(context: BlockContext, scorer: Scorer, per_layer_statistics: bool) -> dict[str, dict[str, Any]]:
    """Observe the block's layers on its inputs and score them; with the scorer's keep_pruned, leave them pruned at
    the probe once all are scored.

    per_layer_statistics: observe and score one input at a time (one Gram in memory instead of the block's); the
    weights change only after every layer is scored, so each layer sees the same inputs either way. Layers that
    read one input (q/k/v, gate/up) share its Gram."""
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

    inputs = statistic_readers(context.staged.adapter, list(linears), scorer.statistic_per_input)
    if per_layer_statistics:
        for readers in inputs:
            gram = scorer.statistic(linears[readers[0]])
            with context.phase("observe"):
                observe(linears, dict.fromkeys(readers, gram), forward_until_observed(context), stop_early=True)
                ranks.combine(dict.fromkeys(readers, gram))
            for name in readers:
                score(name, gram)
            del gram
    else:
        grams: dict[str, Gram] = {}
        for readers in inputs:
            grams.update(dict.fromkeys(readers, scorer.statistic(linears[readers[0]])))
        with context.phase("observe"):
            observe(linears, grams, context.forward)
            ranks.combine(grams)
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
