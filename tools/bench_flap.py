"""FLAP benchmark on SmolLM2-135M: perplexity, parameters and forward speed of structurally pruned models.

For each ratio, three ways of choosing what to remove, all with the project's quality protocol (calibration 32
random windows x 512 tokens of WikiText-2 valid, seed 0; perplexity on the first 32 windows x 512 of WikiText-2
test):
    flap        AL-AM structure, WIFV metric, bias compensation (FLAP's recommended setting), the attention scores
                squared before standardizing as the reference code squares them
    flap-plain  the same with the attention scores plain (the paper's equations; layerpress before it followed
                the reference)
    ul-um       UL-UM structure (every layer pruned alike), WIFV metric, bias compensation
    wanda-sp    UL-UM structure, WIFN metric (Wanda's |W|·‖x‖), no compensation, plain scores (the reference's
                prune_wanda_sp squares nothing): a Wanda-style structured baseline
Forward speed: one window of 512 tokens through the whole model (no cache) on one thread, dense and pruned runs
interleaved so that both see the same machine load, repeated; wall-clock and CPU-time tokens/s (CPU time: what
the forward itself consumed, little disturbed by other processes) with medians, extremes and paired speed-ups.

    python tools/bench_flap.py [--ratios 0.2 0.3] [--configurations flap flap-plain] [--workdir runs/bench-flap]
        [--repeats 10] [--seeds 0 1 2]

--seeds: calibration draws besides the protocol's seed 0 (perplexity only; speed is seed 0's), to tell a difference
between configurations from the spread of the window draw.

Compress runs resume (and finished ones are skipped); finished measurements are kept in WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from streamer.data import DEFAULT_EVALUATION, evaluation_windows, load_text, load_tokenizer, tokenize  # noqa: E402
from streamer.model import load_model  # noqa: E402
from tools.smollm2_demo import PROTOCOL, cli, perplexity  # noqa: E402

CONFIGURATIONS = {
    "flap": ["--structure", "AL-AM", "--metric", "WIFV"],
    "flap-plain": ["--structure", "AL-AM", "--metric", "WIFV", "--attention-scores", "plain"],
    "ul-um": ["--structure", "UL-UM", "--metric", "WIFV"],
    "wanda-sp": ["--structure", "UL-UM", "--metric", "WIFN", "--no-compensation", "--attention-scores", "plain"],
}


def parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())  # tied weights once


def forward_seconds(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one forward (no cache)."""
    with torch.inference_mode():
        wall, cpu = time.perf_counter(), time.process_time()
        model(ids, use_cache=False)
        return time.perf_counter() - wall, time.process_time() - cpu


def speed(dense_dir: Path, pruned_dir: Path, ids: torch.Tensor, repeats: int) -> dict:
    """Tokens per second of both models, measured alternately on one thread.

    One thread, because on a shared machine a multi-threaded forward waits for its slowest thread; CPU seconds
    (what the forward itself consumed) are far less disturbed by other processes than wall-clock seconds; and the
    speed-up of each dense/pruned pair of runs cancels slow drifts of the machine's load. Both are reported.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = {"dense": load_model(dense_dir), "pruned": load_model(pruned_dir)}
        for model in models.values():
            forward_seconds(model, ids)  # warm-up
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                times[name].append(forward_seconds(model, ids))
    finally:
        torch.set_num_threads(threads)
    tokens = ids.numel()
    result: dict = {"repeats": repeats, "tokens": tokens, "threads": 1}
    for clock, column in (("wall", 0), ("cpu", 1)):
        seconds = {name: [t[column] for t in values] for name, values in times.items()}
        for name, values in seconds.items():
            result[f"{name}_{clock}_tokens_per_s"] = {
                "median": tokens / statistics.median(values), "min": tokens / max(values), "max": tokens / min(values)}
        ratios = sorted(d / p for d, p in zip(seconds["dense"], seconds["pruned"]))
        result[f"{clock}_speedup"] = {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}
    return result


def main_job() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "smollm2-135m")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--configurations", nargs="+", choices=sorted(CONFIGURATIONS), default=list(CONFIGURATIONS))
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-flap")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per model (default: 10)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds (default: 0)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results_path = args.workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2))

    if "dense" not in results:
        results["dense"] = {"ppl": perplexity(args.model, args.device), "parameters": parameters(load_model(args.model))}
        save()
    ids = evaluation_windows(tokenize(load_tokenizer(args.model), load_text(DEFAULT_EVALUATION)), 512, 1)
    for ratio, name, seed in itertools.product(args.ratios, args.configurations, args.seeds):
        key = f"{name}-{ratio}" + (f"-seed{seed}" if seed else "")
        out = args.workdir / key
        if key not in results:
            cli("compress", "--model", str(args.model), "--out", str(out), "--method", "flap", "--ratio",
                str(ratio), *CONFIGURATIONS[name], "--device", args.device, *PROTOCOL, "--nsamples", "32",
                "--seed", str(seed))
            record = json.loads((out / "config.json").read_text())["layerpress"]["parameters"]
            results[key] = {"ppl": perplexity(out, args.device), "parameters": parameters(load_model(out)),
                            "removed_fraction_of_prunable": record["removed_fraction"], "seed": seed}
            save()
        if seed == 0 and "speed" not in results[key]:
            results[key]["speed"] = speed(args.model, out, ids, args.repeats)
            save()
    print(f"SmolLM2-135M, WikiText-2 test perplexity (32 x 512); dense {results['dense']['ppl']:.2f}, "
          f"{results['dense']['parameters'] / 1e6:.2f}M parameters")
    print("| ratio | method | ppl | parameters | removed of prunable | tokens/s dense | tokens/s pruned | speed-up "
          "wall (median, min-max) | speed-up CPU time (median, min-max) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ratio in args.ratios:
        for name in args.configurations:
            entry = results[f"{name}-{ratio}"]
            fast = entry["speed"]
            print(f"| {ratio:.0%} | {name} | {entry['ppl']:.2f} | {entry['parameters'] / 1e6:.2f}M | "
                  f"{entry['removed_fraction_of_prunable']:.2%} | {fast['dense_cpu_tokens_per_s']['median']:.0f} | "
                  f"{fast['pruned_cpu_tokens_per_s']['median']:.0f} | " + " | ".join(
                      f"{fast[key]['median']:.2f}x ({fast[key]['min']:.2f}-{fast[key]['max']:.2f})"
                      for key in ("wall_speedup", "cpu_speedup")) + " |")
    if args.seeds != [0]:
        for ratio, name in itertools.product(args.ratios, args.configurations):
            ppls = [results[f"{name}-{ratio}" + (f"-seed{seed}" if seed else "")]["ppl"] for seed in args.seeds]
            print(f"{name} {ratio:.0%} over calibration seeds {args.seeds}: " + ", ".join(f"{p:.2f}" for p in ppls)
                  + f" (mean {statistics.mean(ppls):.2f}, spread {max(ppls) / min(ppls) - 1:.1%})")
    print(json.dumps(results))


if __name__ == "__main__":
    main_job()
