"""Our SparseGPT against the reference implementation (IST-DASLab/sparsegpt), in one sitting, like with like.

    git clone https://github.com/IST-DASLab/sparsegpt REF     # not bundled: the reference's code is not ours
    python tools/bench_reference.py --reference REF [--out runs/reference] [--only base seed-1 ...]

SmolLM2, SparseGPT 50%, the quality protocol's calibration (32 windows x 512 tokens of WikiText-2 valid) and
evaluation (the first 32 x 512 windows of WikiText-2 test). Both sides are calibrated on the *same* windows (ours,
drawn by `CalibrationOptions`, handed to the reference's loop), because the draw alone moves the result by ~2.7%.
A comparison is only as sharp as the noise of either side, so each side runs under a few perturbations that should
not matter, and the report gives each side's spread next to the paired difference:

  base           seed 0, 2 threads (ours: the micro-batch its plan picks, 4 here on a CPU; the reference: one window)
  1-thread       the same with one thread: another float summation order in every matrix product
  micro-batch-1  ours only, one window per forward (the reference has no such knob)
  micro-batch-4  ours only, four windows per forward
  seed-1, seed-2 other calibration windows, the same on both sides

and, against that spread, the precision variants of ours (issue 16: is low precision within the noise?):

  gram-bf16      --gram-dtype bfloat16 (XᵀX from bf16 inputs, float32 sums)
  bf16           --dtype bfloat16 (the block's forwards in bf16; Gram, solves and sweep in float32)
  bf16-gram-bf16 both

Each run is its own process, measured from outside (wall time, peak RSS); both outputs are evaluated by
`main.py eval`. The reference runs its own `llama_sequential` and `SparseGPT` class, imported from REF, on the whole
model loaded into RAM with `LlamaForCausalLM.from_pretrained` (as its llama.py does), then saved with
save_pretrained. What it needs to run here, all done from outside its files: its module globals (`args`, which its
loop reads; the model's `seqlen`), our calibration windows in its loader's format (it would download WikiText-2
train), `torch.cuda.synchronize` made a no-op on a CPU-only torch, and rotary position embeddings handed to each
decoder layer (its loop passes only the attention mask, which today's transformers layers no longer accept alone).
The time measured for each is the whole process: imports, loading, calibration, pruning and saving; wall times are
only comparable within a sitting on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.bench_stream import SMOLLM2, ensure_smollm2, eval_ppl, predicted_peak, run_measured  # noqa: E402

NSAMPLES, SEQLEN, SPARSITY = 32, 512, 0.5


@dataclass(frozen=True)
class Perturbation:
    """One setting that should not change the result: the calibration seed, the threads, our micro-batch."""

    seed: int = 0
    threads: int = 2
    micro_batch: int | None = None  # ours only; None: the plan's choice
    options: tuple[str, ...] = ()  # ours only: a precision variant's compress options

    @property
    def both_sides(self) -> bool:
        return self.micro_batch is None and not self.options

    @property
    def in_spread(self) -> bool:
        """A perturbation that should not matter (counted in a side's spread), not a variant measured against it."""
        return not self.options


PERTURBATIONS = {
    "base": Perturbation(),
    "1-thread": Perturbation(threads=1),
    "micro-batch-1": Perturbation(micro_batch=1),
    "micro-batch-4": Perturbation(micro_batch=4),
    "seed-1": Perturbation(seed=1),
    "seed-2": Perturbation(seed=2),
    "gram-bf16": Perturbation(options=("--gram-dtype", "bfloat16")),
    "bf16": Perturbation(options=("--dtype", "bfloat16")),
    "bf16-gram-bf16": Perturbation(options=("--dtype", "bfloat16", "--gram-dtype", "bfloat16")),
}


def rotary_for_layers(model) -> None:
    """Let the model's decoder layers make their own rotary embeddings when a caller passes none."""
    import torch

    rotary = model.model.rotary_emb
    layer_class = type(model.model.layers[0])
    forward = layer_class.forward

    def with_rotary(self, hidden_states, *args, **kwargs):
        if kwargs.get("position_embeddings") is None:
            positions = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
            kwargs["position_embeddings"] = rotary(hidden_states, positions)
        return forward(self, hidden_states, *args, **kwargs)

    layer_class.forward = with_rotary


def reference_child(reference: Path, out: Path, seed: int) -> None:
    """In this process: prune SmolLM2 with the reference's loop and class, save the result to `out`."""
    import torch

    torch.cuda.synchronize = lambda *args, **kwargs: None  # the reference calls it after each layer
    sys.path.insert(0, str(reference))
    import llama  # the reference's module: it star-imports its sparsegpt, modelutils and quant modules

    from streamer.checkpoint import Checkpoint
    from streamer.data import CalibrationOptions
    from streamer.writer import copy_side_files

    started = time.perf_counter()
    model = llama.get_llama(str(SMOLLM2))
    model.eval()
    model.seqlen = SEQLEN
    rotary_for_layers(model)
    windows = CalibrationOptions(nsamples=NSAMPLES, seqlen=SEQLEN, seed=seed).load(SMOLLM2, Checkpoint(SMOLLM2).config)
    dataloader = [(window.unsqueeze(0), None) for window in windows.windows]
    llama.args = argparse.Namespace(
        nsamples=NSAMPLES, sparsity=SPARSITY, prunen=0, prunem=0, percdamp=0.01, blocksize=128, wbits=16,
        minlayer=-1, maxlayer=1000, prune_only="", invert=False, true_sequential=False,
    )
    llama.llama_sequential(model, dataloader, torch.device("cpu"))
    pruned = time.perf_counter() - started
    model.save_pretrained(out)
    copy_side_files(SMOLLM2, out)  # the tokenizer, as compress copies it to its outputs
    print(json.dumps({"load_calibrate_prune_seconds": pruned}))


def run_side(side: str, name: str, perturbation: Perturbation, reference: Path, out: Path) -> dict:
    """One compression run of `side` under `perturbation`, measured, and its perplexity."""
    directory = out / f"{side}-{name}"
    if side == "reference":
        argv = ["child", "--reference", str(reference), "--out", str(directory), "--seed", str(perturbation.seed)]
        run = run_measured(argv, script="tools/bench_reference.py", threads=perturbation.threads)
    else:
        micro_batch = [] if perturbation.micro_batch is None else ["--micro-batch", str(perturbation.micro_batch)]
        argv = ["compress", "--model", str(SMOLLM2), "--out", str(directory), "--method", "sparsegpt", "--sparsity",
                str(SPARSITY), "--device", "cpu", "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--seed",
                str(perturbation.seed), *micro_batch, *perturbation.options, "--restart"]
        run = run_measured(argv, threads=perturbation.threads)
    result = {"seconds": run["seconds"], "peak_rss_mib": run["peak_rss_mib"], "ppl": eval_ppl(directory)}
    if side == "ours":
        result["planned_peak_mib"] = predicted_peak(run["output"]) / 2**20
    print(f"{side:9s} {name:14s} {run['seconds']:7.1f} s  peak RSS {run['peak_rss_mib']:6.0f} MiB  "
          f"ppl {result['ppl']:.2f}", flush=True)
    return result


def spread(values: list[float]) -> dict:
    """Mean and (max − min) / mean of a side's perplexities over the perturbations."""
    mean = statistics.fmean(values)
    return {"mean": mean, "min": min(values), "max": max(values), "relative_spread": (max(values) - min(values)) / mean}


def report(results: dict) -> str:
    """A Markdown table: each perturbation's perplexity on both sides, the paired difference, each side's spread."""
    lines = ["| perturbation | reference ppl | ours ppl | ours vs reference |", "|---|---|---|---|"]
    for name in PERTURBATIONS:
        reference, ours = results["reference"].get(name), results["ours"].get(name)
        if reference is None and ours is None:
            continue
        cell = lambda run: "—" if run is None else f"{run['ppl']:.2f}"  # noqa: E731
        paired = "—" if reference is None or ours is None else f"{ours['ppl'] / reference['ppl'] - 1:+.1%}"
        lines.append(f"| {name} | {cell(reference)} | {cell(ours)} | {paired} |")
    for side in ("reference", "ours"):
        values = [run["ppl"] for name, run in results[side].items() if PERTURBATIONS[name].in_spread]
        if len(values) > 1:
            summary = spread(values)
            lines.append(f"\n{side}: mean {summary['mean']:.2f} over {len(values)} perturbations, "
                         f"{summary['min']:.2f}-{summary['max']:.2f} (spread {summary['relative_spread']:.1%})")
            if side == "ours":
                for name, run in results[side].items():
                    if not PERTURBATIONS[name].in_spread:
                        inside = "inside" if summary["min"] <= run["ppl"] <= summary["max"] else "outside"
                        lines.append(f"ours {name}: ppl {run['ppl']:.2f}, {run['ppl'] / summary['mean'] - 1:+.1%} "
                                     f"of the mean, {inside} the spread; {run['seconds']:.1f} s, "
                                     f"{run['peak_rss_mib']:.0f} MiB")
    base = {side: results[side].get("base") for side in ("reference", "ours")}
    if all(base.values()):
        lines.append(f"\nbase: reference {base['reference']['seconds']:.1f} s, {base['reference']['peak_rss_mib']:.0f} "
                     f"MiB; ours {base['ours']['seconds']:.1f} s, {base['ours']['peak_rss_mib']:.0f} MiB (planned "
                     f"{base['ours']['planned_peak_mib']:.0f} MiB)")
    return "\n".join(lines)


def bench(reference: Path, out: Path, only: list[str]) -> dict:
    ensure_smollm2()
    results_file = out / "reference.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"reference": {}, "ours": {}}
    for name in only or PERTURBATIONS:
        perturbation = PERTURBATIONS[name]
        for side in ("reference", "ours") if perturbation.both_sides else ("ours",):
            results[side][name] = run_side(side, name, perturbation, reference, out)
            results_file.write_text(json.dumps(results, indent=2))  # a long sitting keeps what it finished
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=("bench", "child"), default="bench",
                        help="bench (default); child is the reference run's own process")
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of IST-DASLab/sparsegpt")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reference")
    parser.add_argument("--only", nargs="*", choices=sorted(PERTURBATIONS), default=[],
                        help="these perturbations (default: all; finished ones are kept in OUT/reference.json)")
    parser.add_argument("--seed", type=int, default=0, help="child: the calibration seed")
    args = parser.parse_args()
    if not (args.reference / "llama.py").is_file() or not (args.reference / "sparsegpt.py").is_file():
        sys.exit(f"{args.reference} is not a checkout of IST-DASLab/sparsegpt (no llama.py and sparsegpt.py)")
    if args.command == "child":
        reference_child(args.reference.resolve(), args.out, args.seed)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = bench(args.reference.resolve(), args.out, args.only)
    table = report(results)
    (args.out / "reference.md").write_text(table + "\n")
    print(table)
    print(f"\nreproduce: python tools/bench_reference.py --reference REF --out {args.out}")


if __name__ == "__main__":
    main()
