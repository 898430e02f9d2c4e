"""FLAP (An et al., 2024): fluctuation-based adaptive structured pruning, no retraining.

Scores, for every input channel j of a group's consumer layer (attention output, MLP down projection), with the
mean and variance taken over all calibration tokens of the dense model:
  WIFV  S_j = Var(x_j) · ‖W[:, j]‖²             how much the layer's output fluctuates through channel j (default)
  IFV   S_j = Var(x_j)
  WIFN  S_j = mean_i |W_ij| · √E[x_j²]           Wanda's |W|·‖x‖, averaged over the output rows
The attention output's channel scores are squared first (--attention-scores squared, the default), as the
reference code does (lib/prune.py squares the o_proj metric, not the MLP's; the paper's equations do not), which
stretches the heads' spread before they compete with the MLP channels. Scores are standardized within each block
and group, (S − mean) / std, so that attention and MLP, shallow and deep
layers compete on one scale; a unit's score is the mean over its channels (a key/value head with its query heads,
or one MLP channel).
Structure:
  AL-AM  every unit of the model competes with every other; the best are kept, each costing its real parameter
         count, until the kept parameters come closest to (1 − ratio) of all prunable ones (default).
  UL-UM  every block keeps (1 − ratio) of its prunable parameters: coarse groups (attention) keep the whole number
         of units nearest to (1 − ratio) of theirs, the group with the cheapest unit (MLP) takes what is left.
Every group keeps at least its best unit: a layer with no head left has no attention to run.
Compensation: what the removed channels contributed on average moves into the consumer's bias,
b += W[:, removed] · mean(x_removed), so the layer's mean output over the calibration tokens is unchanged.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import torch
from torch import nn

from .base import ChannelSummary, PrunedLayer, Statistic, StructuredMethod, UnitGroup
from .statistics import Moments

METRICS = ("WIFV", "IFV", "WIFN")
STRUCTURES = ("AL-AM", "UL-UM")
ATTENTION_SCORES = ("squared", "plain")
ATTENTION = "attention"  # the adapters' name for the channel group of attention heads (streamer/adapters/)


COLUMN_SUM_VALUES = 1 << 23  # weights per chunk of a column sum: 64 MiB in float64


def column_sums(weight: torch.Tensor, power: int) -> torch.Tensor:
    """Σ_i |W_ij|^power over the rows, in float64, a chunk of rows at a time: a whole float64 copy of OPT-66B's fc2
    (and its powers) raised the statistics pass's peak from 4.3 to 7.5 GiB."""
    rows = max(1, COLUMN_SUM_VALUES // weight.shape[1])
    sums = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        sums += weight[start : start + rows].double().abs().pow(power).sum(dim=0)
    return sums


def fluctuation_scores(metric: str, weight: torch.Tensor, moments: Moments) -> torch.Tensor:
    """The per-input-channel score of a consumer layer of weight (out, in) under `metric`, in float64."""
    if metric == "IFV":
        return moments.variance.clone()
    if metric == "WIFV":
        return moments.variance * column_sums(weight, 2)
    return column_sums(weight, 1) / weight.shape[0] * moments.mean_square.sqrt()


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """(S − mean) / std over one group's channels; all zeros where the scores do not vary."""
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    spread = scores.std()
    if spread == 0 or not torch.isfinite(spread):
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / spread


def unit_scores(group: UnitGroup) -> torch.Tensor:
    """A unit's score: the mean of its channels' standardized scores."""
    return standardize(group.scores.double()).view(group.units, group.width).mean(dim=1)


def unit_channels(keep: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the channels of the units where `keep` is True (unit u: channels u·width .. (u+1)·width − 1)."""
    units = keep.nonzero().flatten()
    return (units[:, None] * width + torch.arange(width, device=keep.device)).flatten()


def best_units(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` best-scored units (earlier units win ties)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.sort(scores, descending=True, stable=True).indices[:count]] = True
    return keep


def select_global(groups: list[UnitGroup], ratio: float) -> list[torch.Tensor]:
    """AL-AM: rank all units of all groups together; keep the best prefix whose cost comes closest to the budget."""
    scores = [unit_scores(group) for group in groups]
    keep = [best_units(score, 1) for score in scores]  # every group's best unit stays, whatever the ranking
    budget = (1 - ratio) * sum(group.units * group.cost for group in groups)
    retained = sum(group.cost for group in groups)
    if retained > budget:
        raise ValueError(f"ratio {ratio} leaves fewer parameters than one unit per layer and group needs")
    candidates = torch.cat([score.masked_fill(kept, float("-inf")) for score, kept in zip(scores, keep)])
    costs = torch.cat([torch.full((group.units,), group.cost, dtype=torch.float64) for group in groups])
    order = torch.sort(candidates, descending=True, stable=True).indices
    order = order[: sum(group.units - 1 for group in groups)]  # the floors, ranked last, are already kept
    reached = retained + torch.cat([torch.zeros(1, dtype=torch.float64), costs[order].cumsum(0)])
    count = int(torch.argmin((reached - budget).abs()))  # first of equally close prefixes: the smaller one
    chosen = torch.zeros(candidates.numel(), dtype=torch.bool)
    chosen[order[:count]] = True
    return [kept | part for kept, part in zip(keep, chosen.split([group.units for group in groups]))]


def select_uniform(groups: list[UnitGroup], ratio: float) -> list[torch.Tensor]:
    """UL-UM: every block keeps (1 − ratio) of its parameters; coarse groups round, the finest takes the rest."""
    keep: list[torch.Tensor | None] = [None] * len(groups)
    blocks: dict[int, list[int]] = {}
    for position, group in enumerate(groups):
        blocks.setdefault(group.block, []).append(position)
    for members in blocks.values():
        finest = min(members, key=lambda position: groups[position].cost)
        budget = (1 - ratio) * sum(groups[p].units * groups[p].cost for p in members)
        for position in members:
            if position != finest:
                group = groups[position]
                count = min(max(round((1 - ratio) * group.units), 1), group.units)
                keep[position] = best_units(unit_scores(group), count)
                budget -= count * group.cost
        group = groups[finest]
        count = min(max(round(budget / group.cost), 1), group.units)
        keep[finest] = best_units(unit_scores(group), count)
    return keep


@dataclass
class Flap(StructuredMethod):
    """ratio: fraction of the prunable parameters (all heads and MLP channels) to remove."""

    ratio: float = 0.2
    structure: str = "AL-AM"
    metric: str = "WIFV"
    compensate: bool = True
    attention_scores: str = "squared"

    name = "flap"
    summary = ("structured: remove whole attention heads and MLP channels by fluctuation scores, compensate with "
               "biases; writes a smaller model (--ratio, --structure, --metric)")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ratio", type=float, default=0.2,
                            help="flap: fraction of the parameters of all heads and MLP channels to remove "
                            "(default: 0.2)")
        parser.add_argument("--structure", choices=STRUCTURES, default="AL-AM",
                            help="flap: AL-AM ranks all units of the model together (adaptive widths per layer); "
                            "UL-UM prunes every layer alike (default: AL-AM)")
        parser.add_argument("--metric", choices=METRICS, default="WIFV",
                            help="flap: channel score: WIFV = Var(x)·‖W col‖², IFV = Var(x), WIFN = |W|·‖x‖ "
                            "(default: WIFV)")
        parser.add_argument("--attention-scores", choices=ATTENTION_SCORES, default="squared",
                            help="flap: square the attention heads' channel scores before standardizing, as the "
                            "reference code does, or use them plain (default: squared)")
        parser.add_argument("--no-compensation", action="store_true",
                            help="flap: do not fold the removed channels' mean contribution into biases")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Flap":
        return cls(ratio=args.ratio, structure=args.structure, metric=args.metric,
                   compensate=not args.no_compensation, attention_scores=args.attention_scores)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"flap --ratio must be in [0, 1), got {self.ratio}")
        if self.structure not in STRUCTURES or self.metric not in METRICS or self.attention_scores not in ATTENTION_SCORES:
            raise ValueError(f"flap: unknown structure {self.structure!r}, metric {self.metric!r} or attention "
                             f"scores {self.attention_scores!r}")

    @property
    def adds_bias(self) -> bool:
        return self.compensate

    def statistic(self, consumer: nn.Linear) -> Moments:
        return Moments(consumer)

    def summarize(self, consumer: nn.Linear, statistic: Statistic) -> ChannelSummary:
        assert isinstance(statistic, Moments)
        scores = fluctuation_scores(self.metric, consumer.weight.detach(), statistic)
        return ChannelSummary(scores, statistic.mean.clone())

    def select(self, groups: list[UnitGroup]) -> list[torch.Tensor]:
        if self.attention_scores == "squared":
            groups = [replace(group, scores=group.scores.double().pow(2)) if group.name == ATTENTION else group
                      for group in groups]
        return (select_global if self.structure == "AL-AM" else select_uniform)(groups, self.ratio)

    def prune(
        self, producers: dict[str, nn.Linear], consumer: nn.Linear, keep: torch.Tensor, summary: ChannelSummary
    ) -> tuple[dict[str, PrunedLayer], PrunedLayer]:
        units = keep.numel()
        pruned = {}
        for name, layer in producers.items():
            rows = unit_channels(keep, layer.out_features // units).to(layer.weight.device)
            bias = layer.bias.detach()[rows] if layer.bias is not None else None
            pruned[name] = PrunedLayer(layer.weight.detach()[rows], bias)
        width = consumer.in_features // units
        weight = consumer.weight.detach()
        columns = unit_channels(keep, width).to(weight.device)
        bias = consumer.bias.detach().double() if consumer.bias is not None else None
        if self.compensate:
            removed = unit_channels(~keep, width).to(weight.device)
            shift = weight[:, removed].double() @ summary.mean.to(weight.device)[removed]
            bias = shift if bias is None else bias + shift
        return pruned, PrunedLayer(weight[:, columns], None if bias is None else bias.to(weight.dtype))
