"""PERP layer-wise reconstruction benchmark on SmolLM2: methods x targets x reconstruction subsets x settings.

PERP's claim (Zimmer et al., 2023) is that reconstructing a few parameters per block "significantly enhances"
Wanda and SparseGPT. Each cell is one `main.py compress` (protocol calibration: 32 windows x 512 tokens of
WikiText-2 valid, seed 0) and one `main.py eval` (first 32 windows x 512 of WikiText-2 test), run as the user would
run them. Two sets of reconstruction hyperparameters (--profile):
    ours   layerpress's defaults: 32 AdamW steps per block of one planned micro-batch each, lr 1e-2, rank 16,
           alpha 16, float32
    paper  the reference code's (ZIB-IOL/PERP prune_methods.py, main.py defaults): 20 steps of one window each
           (batch size 1), lr 5e-4, 10% warm-up then linear decay, rank 16, alpha 32; it trains under fp16
           autocast on a GPU, here in float32
Cells run in priority order (60% first, both methods, every subset; then 50%, 2:4, 70%; magnitude last) and are
skipped when their result is already in WORKDIR/results.jsonl, so an interrupted benchmark resumes where it
stopped. --table prints what is there as a Markdown table.

    python tools/bench_perp.py [--profile ours|paper] [--targets 0.6 0.5 2:4 0.7] [--methods wanda sparsegpt]
        [--subsets none biases,norms ...] [--workdir runs/bench-perp] [--threads 2] [--limit N] [--table]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "checkpoints" / "smollm2-135m"  # where tools/smollm2_demo.py converts it
PROTOCOL = ["--seqlen", "512", "--device", "cpu"]
CALIBRATION = ["--nsamples", "32", "--seed", "0"]
EVALUATION = ["--windows", "32"]
METHODS = ("magnitude", "wanda", "sparsegpt")
TARGETS = ("0.5", "0.6", "0.7", "2:4")
SUBSETS = ("none", "biases,norms", "biases,norms,masklora", "biases,norms,scalelora", "masklora", "scalelora")
PROFILES = {
    "ours": [],  # the defaults of methods/reconstruct.py's Reconstruction
    "paper": ["--recon-steps", "20", "--recon-lr", "5e-4", "--recon-warmup", "0.1", "--lora-rank", "16",
              "--lora-alpha", "32", "--micro-batch", "1"],
}


def cells(methods: list[str], targets: list[str], profile: str,
          subsets: tuple[str, ...] | list[str] = SUBSETS[:4]) -> list[tuple[str, str, str, str]]:
    """(method, target, subsets, profile) in priority order: each of `subsets` (default: every one the issue asks
    for), target by target. Without reconstruction the profile does not matter: those cells are always "ours"."""
    order = []
    for target in targets:
        for method in methods:
            order += [(method, target, chosen, "ours" if chosen == "none" else profile) for chosen in subsets]
    return list(dict.fromkeys(order))


def cell_name(method: str, target: str, subsets: str, profile: str) -> str:
    suffix = "" if profile == "ours" else f"-{profile}"
    return f"{method}-{target.replace(':', 'of')}-{subsets.replace(',', '+')}{suffix}"


def run(argv: list[str], env: dict[str, str]) -> tuple[str, float]:
    """One main.py command in a fresh process, echoed on stderr as the command that reproduces it; its standard
    output and wall time."""
    print(f"$ OMP_NUM_THREADS={env['OMP_NUM_THREADS']} python main.py " + shlex.join(argv), file=sys.stderr, flush=True)
    clock = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "-q", *argv], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(argv)}\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - clock


def measure(method: str, target: str, subsets: str, profile: str, args: argparse.Namespace,
            env: dict[str, str]) -> dict:
    out = args.workdir / cell_name(method, target, subsets, profile)
    sparsity = ["--pattern", target] if ":" in target else ["--sparsity", target]
    recon = [] if subsets == "none" else ["--reconstruct", subsets, *PROFILES[profile]]
    _, compress_seconds = run(["compress", "--model", str(args.model), "--out", str(out), "--method", method,
                               *sparsity, *recon, *PROTOCOL, *CALIBRATION], env)
    stdout, eval_seconds = run(["eval", "--model", str(out), *PROTOCOL, *EVALUATION], env)
    journal = json.loads((out / ".layerpress" / "journal.json").read_text())["body"]
    timings = journal["timings"]
    record = json.loads((out / "config.json").read_text())["layerpress"]
    summary = record.get("reconstruction_summary", {})
    return {
        "method": method, "target": target, "subsets": subsets, "ppl": json.loads(stdout.splitlines()[-1])["ppl"],
        "compress_seconds": compress_seconds, "eval_seconds": eval_seconds,
        "reconstruct_seconds_per_block": sum(t.get("reconstruct", 0.0) for t in timings) / len(timings),
        "compress_seconds_per_block": sum(t.get("compress", 0.0) for t in timings) / len(timings),
        "trained_fraction_of_model": summary.get("fraction_of_model_parameters", 0.0),
        "trained_fraction_of_blocks": summary.get("fraction_of_block_parameters", 0.0),
        "profile": profile, "reconstruction": record.get("reconstruction"), "micro_batch": record.get("micro_batch"),
        "threads": args.threads,
    }


def table(results: list[dict]) -> str:
    """Perplexity per method and target (rows) and subset and profile (columns), and each subset's trained share."""
    by_cell = {(r["method"], r["target"], r["subsets"], r.get("profile", "ours")): r for r in results}
    columns = [("none", "ours")] + [(subsets, profile) for profile in PROFILES for subsets in SUBSETS[1:]
                                    if any(key[2:] == (subsets, profile) for key in by_cell)]
    lines = ["| method | target | " + " | ".join(s if p == "ours" else f"{s} ({p})" for s, p in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for target in TARGETS:
        for method in METHODS:
            row = [by_cell.get((method, target, *column)) for column in columns]
            if any(row):
                lines.append(f"| {method} | {target} | "
                             + " | ".join(f"{r['ppl']:.2f}" if r else "–" for r in row) + " |")
    lines += ["", "| subsets | profile | trained fraction of the model | of the blocks | reconstruct s/block (mean) |",
              "|---|---|---|---|---|"]
    for subsets, profile in columns[1:]:
        rows = [r for r in results if (r["subsets"], r.get("profile", "ours")) == (subsets, profile)]
        lines.append(f"| {subsets} | {profile} | {rows[0]['trained_fraction_of_model']:.4%} | "
                     f"{rows[0]['trained_fraction_of_blocks']:.4%} | "
                     f"{sum(r['reconstruct_seconds_per_block'] for r in rows) / len(rows):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-perp")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="ours",
                        help="reconstruction hyperparameters: layerpress's defaults or the PERP reference code's")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["wanda", "sparsegpt"])
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=["0.6", "0.5", "2:4", "0.7"])
    parser.add_argument("--subsets", nargs="+", choices=SUBSETS, default=list(SUBSETS[:4]),
                        help="reconstruction subsets to run, in this order (default: none and the three the issue "
                        "asks for)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1 is fastest on a loaded, shared 2-core machine)")
    parser.add_argument("--limit", type=int, default=None, help="run at most this many new cells")
    parser.add_argument("--table", action="store_true", help="only print the results gathered so far")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / "results.jsonl"
    results = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    if not args.table:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        done = {(r["method"], r["target"], r["subsets"], r.get("profile", "ours")) for r in results}
        todo = [cell for cell in cells(args.methods, args.targets, args.profile, args.subsets)
                if cell not in done][: args.limit]
        for number, cell in enumerate(todo, 1):
            result = measure(*cell, args, env)
            results.append(result)
            with open(path, "a") as handle:
                handle.write(json.dumps(result) + "\n")
            print(f"[{number}/{len(todo)}] {cell_name(*cell)}: ppl {result['ppl']:.2f} "
                  f"(compress {result['compress_seconds']:.0f}s, eval {result['eval_seconds']:.0f}s)", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
