"""Which sparsity each linear layer gets: the allocation chosen on the command line, applied to one model.

The maths lives in methods/allocation.py; this module feeds it the model's layers (block index and parameter count,
from the meta skeleton) and, for `score` and `owl`, the per-layer numbers of a score pass (streamer/commands/scores.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from methods import allocation as maths
from methods.quant import BITS
from methods.scores import probe_key
from methods.sensitivity import POLICIES

from .errors import LayerpressError
from .model import LinearLayer

log = logging.getLogger("layerpress")

ALLOCATIONS = ("uniform", "score", "owl", "depth")
SCORE_ESTIMATES = ("obs_loss", "saliency", "relative")
SCORE_CLUSTERS = ("joint", "per-type")
DEFAULT_SPREAD = 0.1  # default bounds: the target ∓ this
SCORES_FILE = "scores.json"


def read_scores(directory: Path) -> dict[str, Any]:
    """The document a score pass wrote to `directory`; a clear error when there is none."""
    path = directory / SCORES_FILE
    if not path.is_file():
        raise LayerpressError(f"{directory} holds no {SCORES_FILE}: run `main.py scores --out {directory}` first")
    try:
        document = json.loads(path.read_text())
        document["sparsities"], document["layers"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise LayerpressError(f"{path} is not a readable scores file: {exc!r}") from exc
    return document


def read_checked_scores(directory: Path, layers: list[LinearLayer]) -> dict[str, Any]:
    """The score pass's document in `directory`, checked to cover exactly these layers."""
    document = read_scores(directory)
    scores = document["layers"]
    missing = [layer.name for layer in layers if layer.name not in scores]
    if missing:
        raise LayerpressError(
            f"the scores in {directory} do not cover this model (no {missing[0]}, {len(missing)} layers "
            "missing): run `main.py scores` on this model"
        )
    mismatched = [layer.name for layer in layers if scores[layer.name]["params"] != layer.params]
    if mismatched:
        raise LayerpressError(f"the scores in {directory} are of another model: {mismatched[0]} differs in size")
    return document


def scores_digest(directory: Path, document: dict[str, Any]) -> dict[str, Any]:
    """What a record keeps of the score pass it read: where, its exact bytes, its inputs."""
    return {"path": str(directory), "sha256": hashlib.sha256((directory / SCORES_FILE).read_bytes()).hexdigest(),
            "inputs": document["inputs"]}


def layer_loss(record: dict[str, Any], estimate: str, probe: float) -> float:
    """A layer's estimated pruning loss at `probe`: obs_loss, saliency, or relative (obs_loss / output energy)."""
    if estimate == "relative":
        return record["obs_loss"][probe_key(probe)] / max(record["output_energy"], 1e-30)
    return record[estimate][probe_key(probe)]


def nearest_probe(document: dict[str, Any], target: float) -> float:
    """The probe sparsity of a scores document closest to `target`."""
    return min(document["sparsities"], key=lambda p: (abs(p - target), p))


@dataclass
class Allocation:
    """kind: uniform, score, owl or depth; min_sparsity/max_sparsity: per-layer bounds (default target ∓ 0.1);
    scores: directory of a score pass (score, owl); levels: log-loss levels (score); estimate: which loss estimate
    the score allocation ranks by; clusters: levels over all layers together, or within each layer type;
    owl_lambda: OWL's spread around the target."""

    kind: str = "uniform"
    min_sparsity: float | None = None
    max_sparsity: float | None = None
    scores: Path | None = None
    levels: int = 3
    estimate: str = "obs_loss"
    clusters: str = "joint"
    owl_lambda: float = 0.08

    def __post_init__(self) -> None:
        if self.kind not in ALLOCATIONS:
            raise LayerpressError(f"unknown allocation {self.kind!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.kind in ("score", "owl") and self.scores is None:
            raise LayerpressError(f"--allocation {self.kind} needs --scores DIR (written by `main.py scores`)")
        if (self.levels < 1 or self.owl_lambda < 0 or self.estimate not in SCORE_ESTIMATES
                or self.clusters not in SCORE_CLUSTERS):
            raise LayerpressError(
                f"need --levels >= 1, --owl-lambda >= 0, --score-estimate in {SCORE_ESTIMATES} and --score-clusters "
                f"in {SCORE_CLUSTERS}, got {self.levels}, {self.owl_lambda}, {self.estimate!r}, {self.clusters!r}"
            )

    def bounds(self, target: float) -> tuple[float, float]:
        lower = round(max(0.0, target - DEFAULT_SPREAD), 12) if self.min_sparsity is None else self.min_sparsity
        upper = round(min(target + DEFAULT_SPREAD, (1 + target) / 2), 12) if self.max_sparsity is None else self.max_sparsity
        try:
            maths.check_bounds(target, lower, upper)
        except ValueError as exc:
            raise LayerpressError(str(exc)) from exc
        return lower, upper

    def record(self, target: float) -> dict[str, Any]:
        """Everything that changes the chosen sparsities (kept in the journal and config.json)."""
        if self.kind == "uniform":
            return {"kind": "uniform"}
        lower, upper = self.bounds(target)
        record: dict[str, Any] = {"kind": self.kind, "min_sparsity": lower, "max_sparsity": upper}
        if self.kind == "score":
            record.update(levels=self.levels, estimate=self.estimate)
            if self.clusters != "joint":  # absent when joint, so runs recorded before the option still resume
                record["clusters"] = self.clusters
        if self.kind == "owl":
            record.update(owl_lambda=self.owl_lambda)
        if self.kind in ("score", "owl"):
            assert self.scores is not None
            document = read_scores(self.scores)
            record["scores"] = scores_digest(self.scores, document)
            if self.kind == "score":  # OWL's outlier counts do not depend on the probe
                record["scores"]["probe_sparsity"] = nearest_probe(document, target)
        return record

    def layer_sparsities(self, layers: list[LinearLayer], target: float) -> dict[str, float]:
        """The sparsity of every layer; their parameter-weighted mean is `target`."""
        params = [layer.params for layer in layers]
        if self.kind == "uniform":
            return dict(zip((layer.name for layer in layers), maths.uniform(params, target)))
        lower, upper = self.bounds(target)
        if self.kind == "depth":
            chosen = maths.by_depth([layer.block for layer in layers], params, target, lower, upper)
        else:
            assert self.scores is not None
            document = read_checked_scores(self.scores, layers)
            scores = document["layers"]
            if self.kind == "score":
                probe = nearest_probe(document, target)
                if probe != target:
                    log.warning("no scores at sparsity %g in %s; using the nearest probe, %g", target, self.scores, probe)
                losses = [layer_loss(scores[layer.name], self.estimate, probe) for layer in layers]
                kinds = [layer.linear for layer in layers] if self.clusters == "per-type" else None
                chosen = maths.by_score_levels(losses, params, target, lower, upper, self.levels, kinds)
            else:
                ratios = _block_outlier_ratios(layers, scores)
                chosen = maths.owl([ratios[layer.block] for layer in layers], params, target, lower, upper,
                                   self.owl_lambda)
        return dict(zip((layer.name for layer in layers), chosen))

def _block_outlier_ratios(layers: list[LinearLayer], scores: dict[str, dict[str, Any]]) -> dict[int, float]:
    """OWL's outlier ratio of each block: its outlier Wanda scores over all its weights."""
    outliers: dict[int, int] = {}
    weights: dict[int, int] = {}
    for layer in layers:
        outliers[layer.block] = outliers.get(layer.block, 0) + scores[layer.name]["outliers"]
        weights[layer.block] = weights.get(layer.block, 0) + layer.params
    return {block: outliers[block] / weights[block] for block in outliers}


@dataclass
class BitsPolicy:
    """CPTQuant: per-layer bit widths from a sensitivity of the score pass (methods/sensitivity.py).

    kind: None (every layer at --wbits), cmpq, pmpq or tdmpq; average: the parameter-weighted average bits not to
    exceed; choices: the widths a layer may get; scores: directory of a score pass of this model.
    """

    kind: str | None = None
    average: float | None = None
    choices: tuple[int, ...] = (4, 8)
    scores: Path | None = None

    def __post_init__(self) -> None:
        if self.kind is None:
            if self.average is not None:
                raise LayerpressError("--avg-bits is the budget of a --bits-policy: give --bits-policy too")
            return
        if self.kind not in POLICIES:
            raise LayerpressError(f"unknown bits policy {self.kind!r}; choose one of {', '.join(POLICIES)}")
        if self.scores is None or self.average is None:
            raise LayerpressError(f"--bits-policy {self.kind} needs --avg-bits and --scores DIR (written by "
                                  "`main.py scores` on this model)")
        unsupported = [bits for bits in self.choices if bits not in BITS]
        if unsupported:
            raise LayerpressError(f"--bit-choices: {unsupported[0]} bits is not supported; choose from {BITS}")
        try:
            maths.check_bit_budget(self.choices, self.average)
        except ValueError as exc:
            raise LayerpressError(str(exc)) from exc

    @property
    def enabled(self) -> bool:
        return self.kind is not None

    def layer_bits(self, layers: list[LinearLayer]) -> tuple[dict[str, int], dict[str, Any]]:
        """Every layer's bits, and the record of how they were chosen (for the journal and config.json)."""
        assert self.scores is not None and self.average is not None
        document = read_checked_scores(self.scores, layers)
        records = document["layers"]
        missing = [layer.name for layer in layers if self.kind not in records[layer.name]]
        if missing:
            raise LayerpressError(f"the scores in {self.scores} have no {self.kind} sensitivities: rerun "
                                  "`main.py scores` with this layerpress")
        probe = document["sparsities"][0]
        sensitivity = [layer_sensitivity(records[layer.name], self.kind, probe) for layer in layers]
        bits = maths.bits_by_sensitivity(sensitivity, [layer.params for layer in layers], self.choices, self.average)
        chosen = dict(zip((layer.name for layer in layers), bits))
        achieved = maths.weighted_mean(bits, [layer.params for layer in layers])
        record = {"policy": self.kind, "avg_bits": self.average, "bit_choices": list(self.choices),
                  "achieved_avg_bits": achieved, "scores": scores_digest(self.scores, document)}
        if self.kind == "pmpq":
            record["scores"]["probe_sparsity"] = probe
        return chosen, record


def layer_sensitivity(record: dict[str, Any], policy: str, probe: float) -> float:
    """A layer's sensitivity under `policy` from its score record (pmpq at the probe sparsity)."""
    value = record[policy]
    return value[probe_key(probe)] if isinstance(value, dict) else value
