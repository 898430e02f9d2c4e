"""Which sparsity each linear layer gets: the allocation chosen on the command line, applied to one model.

The maths lives in methods/allocation.py; this module feeds it the model's layers (block index and parameter count,
from the meta skeleton) and, for `score` and `owl`, the per-layer numbers of a score pass (streamer/scores.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from methods import allocation as maths
from methods.scores import probe_key

from .errors import LayerpressError
from .model import LinearLayer

log = logging.getLogger("layerpress")

ALLOCATIONS = ("uniform", "score", "owl", "depth")
SCORE_ESTIMATES = ("obs_loss", "saliency", "relative")
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
    the score allocation ranks by; owl_lambda: OWL's spread around the target."""

    kind: str = "uniform"
    min_sparsity: float | None = None
    max_sparsity: float | None = None
    scores: Path | None = None
    levels: int = 3
    estimate: str = "obs_loss"
    owl_lambda: float = 0.08

    def __post_init__(self) -> None:
        if self.kind not in ALLOCATIONS:
            raise LayerpressError(f"unknown allocation {self.kind!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.kind in ("score", "owl") and self.scores is None:
            raise LayerpressError(f"--allocation {self.kind} needs --scores DIR (written by `main.py scores`)")
        if self.levels < 1 or self.owl_lambda < 0 or self.estimate not in SCORE_ESTIMATES:
            raise LayerpressError(
                f"need --levels >= 1, --owl-lambda >= 0 and --score-estimate in {SCORE_ESTIMATES}, got "
                f"{self.levels}, {self.owl_lambda}, {self.estimate!r}"
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
        if self.kind == "owl":
            record.update(owl_lambda=self.owl_lambda)
        if self.kind in ("score", "owl"):
            assert self.scores is not None
            document = read_scores(self.scores)
            record["scores"] = {
                "path": str(self.scores),
                "sha256": hashlib.sha256((self.scores / SCORES_FILE).read_bytes()).hexdigest(),
                "inputs": document["inputs"],
            }
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
            document = self._read_checked(layers)
            scores = document["layers"]
            if self.kind == "score":
                probe = nearest_probe(document, target)
                if probe != target:
                    log.warning("no scores at sparsity %g in %s; using the nearest probe, %g", target, self.scores, probe)
                losses = [layer_loss(scores[layer.name], self.estimate, probe) for layer in layers]
                chosen = maths.by_score_levels(losses, params, target, lower, upper, self.levels)
            else:
                ratios = _block_outlier_ratios(layers, scores)
                chosen = maths.owl([ratios[layer.block] for layer in layers], params, target, lower, upper,
                                   self.owl_lambda)
        return dict(zip((layer.name for layer in layers), chosen))

    def _read_checked(self, layers: list[LinearLayer]) -> dict[str, Any]:
        """The score pass's document, checked to cover exactly these layers."""
        assert self.scores is not None
        document = read_scores(self.scores)
        scores = document["layers"]
        missing = [layer.name for layer in layers if layer.name not in scores]
        if missing:
            raise LayerpressError(
                f"the scores in {self.scores} do not cover this model (no {missing[0]}, {len(missing)} layers "
                "missing): run `main.py scores` on this model"
            )
        mismatched = [layer.name for layer in layers if scores[layer.name]["params"] != layer.params]
        if mismatched:
            raise LayerpressError(f"the scores in {self.scores} are of another model: {mismatched[0]} differs in size")
        return document


def _block_outlier_ratios(layers: list[LinearLayer], scores: dict[str, dict[str, Any]]) -> dict[int, float]:
    """OWL's outlier ratio of each block: its outlier Wanda scores over all its weights."""
    outliers: dict[int, int] = {}
    weights: dict[int, int] = {}
    for layer in layers:
        outliers[layer.block] = outliers.get(layer.block, 0) + scores[layer.name]["outliers"]
        weights[layer.block] = weights.get(layer.block, 0) + layer.params
    return {block: outliers[block] / weights[block] for block in outliers}
