"""Layer-order versus score-based sparsity: the seed paper's experiments on one model, as plots and tables.

For a model and several global sparsities it runs (or reuses) one score pass with every sparsity as a probe, then
compresses and evaluates each METHOD:ALLOCATION run, and writes to the report directory:

    scores_by_type.png    estimated pruning loss of each layer type over depth (the paper's Figure 4)
    ranking_vs_order.png  layers ranked by score against their sequential order, and the per-layer sparsities each
                          allocation chooses (score-based ranking vs layer-order schedules, its Figure 5)
    perplexity.png        perplexity against global sparsity per method and allocation
    allocation_heatmaps.png   the sparsity each run chose per layer type (rows) and block (columns)
    results.json, results.md   every number, with the command that produced it, and which runs beat uniform
                          and the layer-order (depth) allocation of their method

A score allocation may name its variant after an @, to rule out implementation choices before concluding that
score-based ranking loses: `sparsegpt:score@saliency,per-type,pruned` ranks by the one-shot saliency instead of
the sweep's OBS loss (or `relative`: OBS loss over the layer's output energy), clusters each layer type among
itself instead of all layers jointly, and takes scores on inputs through earlier blocks pruned at the target
(sequential pruning's inputs) instead of the dense model's. Defaults: obs_loss, joint, dense.

All steps go through main.py's commands with the project's protocol (calibration --nsamples x --seqlen windows of
the bundled WikiText-2 valid text, seed 0; evaluation on the first --windows windows of WikiText-2 test). Finished
steps are reused: compress and scores resume or skip complete outputs, and each evaluation is kept in
REPORT/results/ keyed by the evaluated model's config.json. Several invocations with disjoint --runs may share one
report directory.

    python tools/rank_experiment.py --model IN --sparsity 0.6 0.7 0.8 --out REPORT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from streamer.allocation import (  # noqa: E402
    ALLOCATIONS, SCORE_CLUSTERS, SCORE_ESTIMATES, SCORES_FILE, Allocation, layer_loss, nearest_probe,
)
from streamer.checkpoint import Checkpoint  # noqa: E402
from streamer.files import atomic_write  # noqa: E402
from streamer.journal import read_journal  # noqa: E402
from streamer.model import LinearLayer, StagedModel  # noqa: E402
from tools.smollm2_demo import cli  # noqa: E402

DEFAULT_RUNS = ["sparsegpt:uniform", "sparsegpt:score", "sparsegpt:owl", "sparsegpt:depth", "wanda:uniform", "wanda:owl"]
NEEDS_SCORES = ("score", "owl")
SCORE_INPUTS = ("dense", "pruned")


@dataclass(frozen=True)
class Variant:
    """One run's allocation: its kind and, for `score`, which loss estimate, clustering and score inputs."""

    kind: str
    estimate: str = "obs_loss"
    clusters: str = "joint"
    inputs: str = "dense"

    @classmethod
    def parse(cls, text: str) -> "Variant":
        kind, _, options = text.partition("@")
        if kind not in ALLOCATIONS or (options and kind != "score"):
            raise ValueError(f"{text!r}: an allocation in {', '.join(ALLOCATIONS)}; only score takes @options")
        chosen: dict[str, str] = {}
        for option in filter(None, options.split(",")):
            field_name = next((name for name, values in (("estimate", SCORE_ESTIMATES), ("clusters", SCORE_CLUSTERS),
                                                          ("inputs", SCORE_INPUTS)) if option in values), None)
            if field_name is None or field_name in chosen:
                raise ValueError(f"{text!r}: {option!r} is not one of {SCORE_ESTIMATES + SCORE_CLUSTERS + SCORE_INPUTS}"
                                 " or repeats a choice")
            chosen[field_name] = option
        return cls(kind, **chosen)

    @property
    def label(self) -> str:
        """The allocation as runs, tables and directories name it: `score` plus what differs from the defaults."""
        changed = [value for value, default in ((self.estimate, "obs_loss"), (self.clusters, "joint"),
                                                (self.inputs, "dense")) if value != default]
        return "-".join([self.kind, *changed])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="dense checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="report directory (models, scores, plots, tables)")
    parser.add_argument("--sparsity", type=float, nargs="+", required=True,
                        help="global sparsities, run in the order given (plots sort them)")
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, metavar="METHOD:ALLOCATION",
                        help=f"compress runs per sparsity (default: {' '.join(DEFAULT_RUNS)})")
    parser.add_argument("--calib", default=None, help="calibration text (default: main.py's, WikiText-2 valid)")
    parser.add_argument("--data", default=None, help="evaluation text (default: main.py's, WikiText-2 test)")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (default: 32)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--windows", type=int, default=32, help="evaluation windows (default: 32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild plots and tables from finished runs")
    args = parser.parse_args(argv)
    for run in args.runs:
        method, _, allocation = run.partition(":")
        try:
            Variant.parse(allocation)
        except ValueError as exc:
            parser.error(f"--runs: {run!r} is not METHOD:ALLOCATION[@OPTIONS]: {exc}")
        if not method:
            parser.error(f"--runs: {run!r} names no method")
    return args


def parse_run(run: str) -> tuple[str, Variant]:
    method, _, allocation = run.partition(":")
    return method, Variant.parse(allocation)


class Experiment:
    """The report directory and the main.py commands that fill it."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out
        self.scores_dir = self.out / "scores"
        self.results_dir = self.out / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.probes = sorted(set(args.sparsity))

    # ---------------------------------------------------------------- commands
    def command(self) -> str:
        """The invocation that (re)produces this whole report."""
        args = self.args
        options = ["--model", str(args.model), "--out", str(self.out), "--sparsity", *(f"{s:g}" for s in args.sparsity),
                   "--runs", *args.runs, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                   "--windows", str(args.windows), "--device", args.device]
        options += ["--calib", args.calib] if args.calib else []
        options += ["--data", args.data] if args.data else []
        return "python tools/rank_experiment.py " + shlex.join(options)

    def calibration(self) -> list[str]:
        text = ["--calib", self.args.calib] if self.args.calib else []
        return [*text, "--nsamples", str(self.args.nsamples), "--seqlen", str(self.args.seqlen), "--seed", "0",
                "--device", self.args.device]

    def scores_path(self, inputs: str, sparsity: float) -> Path:
        """Dense inputs: one pass with every target as a probe; pruned inputs: one pass per target (it prunes)."""
        return self.scores_dir if inputs == "dense" else self.out / f"scores-pruned-{sparsity:g}"

    def scores_command(self, inputs: str = "dense", sparsity: float | None = None) -> list[str]:
        if inputs == "dense":
            return ["scores", "--model", str(self.args.model), "--out", str(self.scores_dir),
                    "--sparsity", *map(str, self.probes), *self.calibration()]
        assert sparsity is not None
        return ["scores", "--model", str(self.args.model), "--out", str(self.scores_path(inputs, sparsity)),
                "--sparsity", str(sparsity), "--inputs", "pruned", *self.calibration()]

    def model_dir(self, method: str, variant: Variant, sparsity: float) -> Path:
        return self.out / "models" / f"{method}-{variant.label}-{sparsity:g}"

    def compress_command(self, method: str, variant: Variant, sparsity: float) -> list[str]:
        command = ["compress", "--model", str(self.args.model), "--out", str(self.model_dir(method, variant, sparsity)),
                   "--method", method, "--sparsity", f"{sparsity:g}", *self.calibration()]
        if variant.kind != "uniform":  # uniform is the default: its command stays the plain one
            command += ["--allocation", variant.kind]
        if variant.estimate != "obs_loss":
            command += ["--score-estimate", variant.estimate]
        if variant.clusters != "joint":
            command += ["--score-clusters", variant.clusters]
        if variant.kind in NEEDS_SCORES:
            command += ["--scores", str(self.scores_path(variant.inputs, sparsity))]
        return command

    def eval_command(self, model: Path) -> list[str]:
        text = ["--data", self.args.data] if self.args.data else []
        return ["eval", "--model", str(model), *text, "--seqlen", str(self.args.seqlen),
                "--windows", str(self.args.windows), "--device", self.args.device]

    # ---------------------------------------------------------------- steps
    def ensure_scores(self, inputs: str = "dense", sparsity: float | None = None) -> None:
        clock = time.perf_counter()
        cli("-q", *self.scores_command(inputs, sparsity))
        print(f"scores ready in {self.scores_path(inputs, sparsity or 0)} ({time.perf_counter() - clock:.0f}s)",
              flush=True)

    def evaluate(self, name: str, model: Path, compress: list[str] | None) -> dict[str, Any]:
        """Perplexity of `model`, reused when this exact model (its config.json) was evaluated before."""
        key = hashlib.sha256((model / "config.json").read_bytes()).hexdigest()
        path = self.results_dir / f"{name}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("config_sha256") == key:
                return cached
        clock = time.perf_counter()
        ppl = json.loads(cli("-q", *self.eval_command(model)).splitlines()[-1])["ppl"]
        result = {"name": name, "ppl": ppl, "eval_seconds": time.perf_counter() - clock, "config_sha256": key,
                  "eval_command": as_shell(self.eval_command(model)),
                  "compress_command": as_shell(compress) if compress else None}
        atomic_write(path, json.dumps(result, indent=1).encode())
        return result

    def run_all(self) -> None:
        variants = [parse_run(run)[1] for run in self.args.runs]
        if any(v.kind in NEEDS_SCORES and v.inputs == "dense" for v in variants):
            self.ensure_scores()
        for sparsity in self.args.sparsity:
            if any(v.kind in NEEDS_SCORES and v.inputs == "pruned" for v in variants):
                self.ensure_scores("pruned", sparsity)
            for run in self.args.runs:
                method, variant = parse_run(run)
                command = self.compress_command(method, variant, sparsity)
                clock = time.perf_counter()
                cli("-q", *command)
                model = self.model_dir(method, variant, sparsity)
                result = self.evaluate(f"{method}-{variant.label}-{sparsity:g}", model, command)
                print(f"{method} {variant.label} {sparsity:g}: ppl {result['ppl']:.2f} "
                      f"({time.perf_counter() - clock:.0f}s)", flush=True)
        self.evaluate("dense", self.args.model, None)


def as_shell(command: list[str]) -> str:
    return "python main.py " + shlex.join(command)


# -------------------------------------------------------------------- report
def short_type(linear: str) -> str:
    """q_proj, self_attn.k_proj, mlp.down_proj, fc1 -> q, k, down, fc1."""
    return linear.rpartition(".")[2].removesuffix("_proj")


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        for rank, index in enumerate(order):
            result[index] = float(rank)
        return result

    ra, rb = ranks(a), ranks(b)
    mean = (len(a) - 1) / 2
    cov = sum((x - mean) * (y - mean) for x, y in zip(ra, rb))
    var = sum((x - mean) ** 2 for x in ra)
    return cov / var if var else float("nan")


def collect(experiment: Experiment) -> dict[str, Any]:
    """Every number of the report: perplexities, layer ranks and allocations, with their commands."""
    args = experiment.args
    report: dict[str, Any] = {
        "command": experiment.command(),
        "model": str(args.model),
        "protocol": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0, "windows": args.windows,
                     "device": args.device},
        "note": "timings measured on a shared, loaded 2-core machine",
        "runs": [],
    }
    params = {layer.name: layer.params
              for layer in StagedModel(Checkpoint(args.model), torch.device("cpu")).linear_layers()}
    dense = experiment.results_dir / "dense.json"
    if dense.is_file():
        report["dense"] = json.loads(dense.read_text())
    for sparsity in sorted(set(args.sparsity)):
        for run in args.runs:
            method, variant = parse_run(run)
            model = experiment.model_dir(method, variant, sparsity)
            path = experiment.results_dir / f"{method}-{variant.label}-{sparsity:g}.json"
            if not path.is_file():
                continue
            entry = {"method": method, "allocation": variant.label, "sparsity": sparsity,
                     **json.loads(path.read_text())}
            journal = read_journal(model) if model.is_dir() else None
            if journal and journal.get("summary"):
                entry["compress_seconds"] = journal["summary"]["seconds"]
            record = json.loads((model / "config.json").read_text()).get("layerpress", {})
            achieved = record.get("layer_sparsity", {})
            targets = record.get("layer_targets") or {}
            entry["layer_sparsity_range"] = [min(achieved.values()), max(achieved.values())] if achieved else None
            if achieved.keys() == params.keys():
                entry["global_sparsity"] = sum(achieved[n] * params[n] for n in params) / sum(params.values())
            entry["layer_targets_range"] = [min(targets.values()), max(targets.values())] if targets else None
            entry["layer_targets"] = targets or {name: sparsity for name in params}  # uniform records none
            report["runs"].append(entry)
    if (experiment.scores_dir / SCORES_FILE).is_file():
        report["scores"] = layer_analysis(experiment)
    return report


def layers_of(document: dict[str, Any]) -> list[LinearLayer]:
    """The scored layers in forward order (block, then the order the score pass recorded them in)."""
    records = document["layers"]
    return [LinearLayer(name, r["block"], r["linear"], r["params"]) for name, r in records.items()]


def layer_analysis(experiment: Experiment) -> dict[str, Any]:
    """Per target: each layer's score rank against its sequential position, and every allocation's choice."""
    document = json.loads((experiment.scores_dir / SCORES_FILE).read_text())
    layers = layers_of(document)
    analysis: dict[str, Any] = {"path": str(experiment.scores_dir / SCORES_FILE), "inputs": document["inputs"],
                                "command": as_shell(experiment.scores_command()), "targets": {}}
    for target in sorted(set(experiment.args.sparsity)):
        probe = nearest_probe(document, target)
        losses = [layer_loss(document["layers"][layer.name], "obs_loss", probe) for layer in layers]
        allocations = {
            kind: Allocation(kind=kind, scores=experiment.scores_dir).layer_sparsities(layers, target)
            for kind in ALLOCATIONS
        }
        analysis["targets"][f"{target:g}"] = {
            "probe": probe,
            "rank_vs_order_spearman": spearman(losses, list(range(len(layers)))),
            "score_vs_depth_allocation_spearman": spearman(
                [allocations["score"][layer.name] for layer in layers],
                [allocations["depth"][layer.name] for layer in layers]),
            "allocations": {kind: [chosen[layer.name] for layer in layers] for kind, chosen in allocations.items()},
        }
    analysis["layers"] = [layer.name for layer in layers]
    return analysis


def plot(experiment: Experiment, report: dict[str, Any]) -> list[str]:
    """Write the PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "scores" in report:
        document = json.loads((experiment.scores_dir / SCORES_FILE).read_text())
        layers = layers_of(document)
        types = list(dict.fromkeys(layer.linear for layer in layers))
        probes = document["sparsities"]
        estimates = ["obs_loss", "saliency"]
        if all("output_energy" in record for record in document["layers"].values()):
            estimates.append("relative")
        figure, axes = plt.subplots(len(estimates), len(probes), figsize=(5 * len(probes), 4 * len(estimates)),
                                    squeeze=False, sharex=True)
        for column, probe in enumerate(probes):
            for row, estimate in enumerate(estimates):
                axis = axes[row][column]
                for linear in types:
                    chosen = [layer for layer in layers if layer.linear == linear]
                    values = [layer_loss(document["layers"][layer.name], estimate, probe) for layer in chosen]
                    axis.plot([layer.block for layer in chosen], [math.log10(max(v, 1e-30)) for v in values],
                              marker=".", label=short_type(linear))
                axis.set_title(f"{estimate} at probe sparsity {probe:g}")
                axis.set_ylabel("log10 estimated loss")
                axis.grid(alpha=0.3)
            axes[-1][column].set_xlabel("block")
        axes[0][0].legend(ncol=2, fontsize=8)
        figure.suptitle(f"Estimated pruning loss per layer type over depth ({document['inputs']} inputs)")
        figure.tight_layout()
        figure.savefig(experiment.out / "scores_by_type.png", dpi=110)
        plt.close(figure)
        written.append("scores_by_type.png")

        targets = report["scores"]["targets"]
        figure, axes = plt.subplots(len(targets), 2, figsize=(14, 3.6 * len(targets)), squeeze=False)
        positions = list(range(len(layers)))
        for row, (target, analysis) in enumerate(targets.items()):
            losses = [layer_loss(document["layers"][layer.name], "obs_loss", analysis["probe"]) for layer in layers]
            order = sorted(positions, key=lambda i: losses[i])
            rank = [0] * len(layers)
            for r, i in enumerate(order):
                rank[i] = r
            axis = axes[row][0]
            for linear in types:
                chosen = [i for i in positions if layers[i].linear == linear]
                axis.scatter(chosen, [rank[i] for i in chosen], s=10, label=short_type(linear))
            axis.plot(positions, positions, color="grey", lw=0.8, ls="--", label="sequential order")
            axis.set_title(f"target {target}: rank by OBS loss (0 = pruned most) vs forward position, "
                           f"Spearman {analysis['rank_vs_order_spearman']:.2f}", fontsize=9)
            axis.set_xlabel("layer position in forward order")
            axis.set_ylabel("rank by score")
            axis = axes[row][1]
            for kind, chosen in analysis["allocations"].items():
                axis.plot(positions, chosen, lw=1, label=kind)
            axis.set_title(f"target {target}: per-layer sparsity, score-based vs layer-order (depth)", fontsize=9)
            axis.set_xlabel("layer position in forward order")
            axis.set_ylabel("sparsity")
            axis.grid(alpha=0.3)
        axes[0][0].legend(ncol=4, fontsize=7)
        axes[0][1].legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(experiment.out / "ranking_vs_order.png", dpi=110)
        plt.close(figure)
        written.append("ranking_vs_order.png")

    if report["runs"]:
        figure, axis = plt.subplots(figsize=(7, 5))
        series: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for run in report["runs"]:
            series.setdefault((run["method"], run["allocation"]), []).append((run["sparsity"], run["ppl"]))
        for (method, allocation), points in sorted(series.items()):
            points.sort()
            axis.plot(*zip(*points), marker="o", ls="-" if method == "sparsegpt" else "--", label=f"{method} {allocation}")
        if "dense" in report:
            axis.axhline(report["dense"]["ppl"], color="black", lw=0.8, label="dense")
        axis.set_yscale("log")
        axis.set_xlabel("global sparsity (parameter-weighted)")
        axis.set_ylabel(f"WikiText-2 perplexity ({experiment.args.windows} x {experiment.args.seqlen})")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(experiment.out / "perplexity.png", dpi=110)
        plt.close(figure)
        written.append("perplexity.png")
        written.append(plot_heatmaps(experiment, report, plt))
    return written


def plot_heatmaps(experiment: Experiment, report: dict[str, Any], plt) -> str:
    """One heatmap per run: the sparsity it chose for every layer, layer type (rows) by block (columns), with its
    perplexity in the title; a row of runs per target sparsity, one colour scale per row."""
    layers = StagedModel(Checkpoint(experiment.args.model), torch.device("cpu")).linear_layers()
    types = list(dict.fromkeys(layer.linear for layer in layers))
    blocks = max(layer.block for layer in layers) + 1
    sparsities = sorted({run["sparsity"] for run in report["runs"]})
    columns = max(sum(run["sparsity"] == s for run in report["runs"]) for s in sparsities)
    figure, axes = plt.subplots(len(sparsities), columns, figsize=(3.2 * columns, 0.32 * len(types) * len(sparsities)
                                                                   + 1.4 * len(sparsities)), squeeze=False)
    for row, sparsity in enumerate(sparsities):
        runs = [run for run in report["runs"] if run["sparsity"] == sparsity]
        spread = [value for run in runs for value in run["layer_targets"].values()]
        low, high = min(spread), max(spread)
        for column in range(columns):
            axis = axes[row][column]
            if column >= len(runs):
                axis.axis("off")
                continue
            run = runs[column]
            grid = torch.full((len(types), blocks), float("nan"))
            for layer in layers:
                grid[types.index(layer.linear), layer.block] = run["layer_targets"][layer.name]
            image = axis.imshow(grid.numpy(), aspect="auto", vmin=low, vmax=max(high, low + 1e-6), cmap="viridis")
            axis.set_title(f"{run['method']} {run['allocation']} {sparsity:g}: ppl {run['ppl']:.1f}", fontsize=7)
            axis.set_yticks(range(len(types)), [short_type(t) for t in types], fontsize=6)
            axis.set_xlabel("block", fontsize=7)
        figure.colorbar(image, ax=list(axes[row]), fraction=0.02, label="layer sparsity")
    figure.savefig(experiment.out / "allocation_heatmaps.png", dpi=110)
    plt.close(figure)
    return "allocation_heatmaps.png"


def markdown(report: dict[str, Any]) -> str:
    sparsities = sorted({run["sparsity"] for run in report["runs"]})
    lines = [f"# Layer-order vs score-based sparsity: {report['model']}", "",
             f"Produced by `{report['command']}` ({report['note']}).", ""]
    if "dense" in report:
        lines += [f"Dense perplexity: {report['dense']['ppl']:.2f} (`{report['dense']['eval_command']}`)", ""]
    table: dict[tuple[str, str], dict[float, dict]] = {}
    for run in report["runs"]:
        table.setdefault((run["method"], run["allocation"]), {})[run["sparsity"]] = run
    lines += ["| method | allocation | " + " | ".join(f"{s:g}" for s in sparsities) + " |",
              "| --- | --- | " + " | ".join("---" for _ in sparsities) + " |"]
    for (method, allocation), runs in table.items():
        cells = []
        for s in sparsities:
            run = runs.get(s)
            if run is None:
                cells.append("")
                continue
            uniform = table.get((method, "uniform"), {}).get(s)
            change = f" ({100 * (run['ppl'] / uniform['ppl'] - 1):+.1f}%)" if uniform and allocation != "uniform" else ""
            cells.append(f"{run['ppl']:.2f}{change}")
        lines.append(f"| {method} | {allocation} | " + " | ".join(cells) + " |")
    lines += ["", "Perplexity (in brackets: change against uniform with the same method and sparsity).", ""]
    lines += verdicts(table, sparsities)
    if "scores" in report:
        lines += [f"Scores: `{report['scores']['command']}` ({report['scores']['inputs']} inputs).", "",
                  "| target | probe | Spearman(score rank, forward position) | Spearman(score allocation, depth allocation) |",
                  "| --- | --- | --- | --- |"]
        for target, analysis in report["scores"]["targets"].items():
            lines.append(f"| {target} | {analysis['probe']:g} | {analysis['rank_vs_order_spearman']:.3f} | "
                         f"{analysis['score_vs_depth_allocation_spearman']:.3f} |")
        lines.append("")
    lines += ["| run | ppl | achieved global sparsity | layer sparsity range | compress s | eval s | compress command "
              "| eval command |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in report["runs"]:
        span = run["layer_sparsity_range"]
        span_text = f"{span[0]:.3f}-{span[1]:.3f}" if span else ""
        overall = f"{run['global_sparsity']:.4f}" if "global_sparsity" in run else ""
        lines.append(f"| {run['name']} | {run['ppl']:.3f} | {overall} | {span_text} | {run.get('compress_seconds', 0):.0f} | "
                     f"{run['eval_seconds']:.0f} | `{run['compress_command']}` | `{run['eval_command']}` |")
    return "\n".join(lines) + "\n"


def verdicts(table: dict[tuple[str, str], dict[float, dict]], sparsities: list[float]) -> list[str]:
    """Per target, the runs that beat uniform and those that beat the layer-order (depth) allocation of their
    method (by perplexity; a single calibration draw, so differences of a few percent are within noise)."""
    lines = ["| target | beat uniform | beat depth (layer order) |", "| --- | --- | --- |"]
    for sparsity in sparsities:
        beats: dict[str, list[str]] = {"uniform": [], "depth": []}
        for (method, allocation), runs in table.items():
            run = runs.get(sparsity)
            for baseline in beats:
                other = table.get((method, baseline), {}).get(sparsity)
                if run and other and allocation != baseline and run["ppl"] < other["ppl"]:
                    beats[baseline].append(f"{method} {allocation} ({100 * (run['ppl'] / other['ppl'] - 1):+.1f}%)")
        lines.append(f"| {sparsity:g} | {', '.join(beats['uniform']) or 'none'} | {', '.join(beats['depth']) or 'none'} |")
    return lines + ["", "Which sparsity each run chose, per layer type and block: `allocation_heatmaps.png`.", ""]


def write_report(experiment: Experiment) -> None:
    report = collect(experiment)
    report["plots"] = plot(experiment, report)
    atomic_write(experiment.out / "results.json", json.dumps(report, indent=1).encode())
    atomic_write(experiment.out / "results.md", markdown(report).encode())
    print(f"wrote {experiment.out / 'results.md'} and {', '.join(report['plots'])}")


def main(argv: list[str] | None = None) -> None:
    experiment = Experiment(parse_args(argv))
    if not experiment.args.report_only:
        experiment.run_all()
    write_report(experiment)


if __name__ == "__main__":
    main()
