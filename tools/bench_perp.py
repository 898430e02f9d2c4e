"""PERP layer-wise reconstruction benchmark on SmolLM2: methods x sparsities x reconstruction subsets.

Each cell is one `main.py compress` (protocol calibration: 32 windows x 512 tokens of WikiText-2 valid, seed 0)
and one `main.py eval` (first 32 windows x 512 of WikiText-2 test), run as the user would run them. Cells run in
priority order, the paper's headline comparison first (magnitude + reconstruction against Wanda and SparseGPT
without it, at 50%, 60% and 2:4), and are skipped when their result is already in WORKDIR/results.jsonl, so an
interrupted benchmark resumes where it stopped. --table prints what is there as a Markdown table.

    python tools/bench_perp.py [--workdir runs/bench-perp] [--recon-steps 16] [--threads 1] [--table]
"""

from __future__ import annotations

import argparse
import json
import os
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
SUBSETS = ("none", "biases,norms", "masklora", "scalelora")


def cells() -> list[tuple[str, str, str]]:
    """(method, target, subsets) in priority order, without repeats: the headline comparison first, 50% Wanda and
    SparseGPT without reconstruction last in it (main's README already has their numbers)."""
    order = [("magnitude", "0.5", "none")] + [("magnitude", "0.5", subsets) for subsets in SUBSETS[1:]]
    for target in ("0.6", "2:4"):
        order += [(method, target, "none") for method in METHODS]
        order += [("magnitude", target, subsets) for subsets in SUBSETS[1:]]
    order += [(method, "0.5", "none") for method in ("wanda", "sparsegpt")]
    for target in ("0.5", "0.6", "2:4"):
        order += [(method, target, subsets) for method in ("wanda", "sparsegpt") for subsets in SUBSETS[1:]]
    order += [(method, "0.7", subsets) for method in METHODS for subsets in SUBSETS]
    return list(dict.fromkeys(order))


def cell_name(method: str, target: str, subsets: str) -> str:
    return f"{method}-{target.replace(':', 'of')}-{subsets.replace(',', '+')}"


def run(argv: list[str], env: dict[str, str]) -> tuple[str, float]:
    clock = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "-q", *argv], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(argv)}\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - clock


def measure(method: str, target: str, subsets: str, args: argparse.Namespace, env: dict[str, str]) -> dict:
    out = args.workdir / cell_name(method, target, subsets)
    sparsity = ["--pattern", target] if ":" in target else ["--sparsity", target]
    recon = [] if subsets == "none" else ["--reconstruct", subsets, "--recon-steps", str(args.recon_steps),
                                          "--recon-lr", str(args.recon_lr)]
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
        "recon_steps": args.recon_steps if recon else 0, "recon_lr": args.recon_lr if recon else 0.0,
        "threads": args.threads,
    }


def table(results: list[dict]) -> str:
    by_cell = {(r["method"], r["target"], r["subsets"]): r for r in results}
    lines = ["| method | target | " + " | ".join(SUBSETS) + " |", "|---|---|" + "---|" * len(SUBSETS)]
    for target in ("0.5", "0.6", "0.7", "2:4"):
        for method in METHODS:
            row = [by_cell.get((method, target, subsets)) for subsets in SUBSETS]
            if any(row):
                lines.append(f"| {method} | {target} | "
                             + " | ".join(f"{r['ppl']:.2f}" if r else "–" for r in row) + " |")
    lines += ["", "| subsets | trained fraction of the model | of the blocks | reconstruct s/block (mean) |",
              "|---|---|---|---|"]
    for subsets in SUBSETS[1:]:
        rows = [r for r in results if r["subsets"] == subsets]
        if rows:
            lines.append(f"| {subsets} | {rows[0]['trained_fraction_of_model']:.4%} | "
                         f"{rows[0]['trained_fraction_of_blocks']:.4%} | "
                         f"{sum(r['reconstruct_seconds_per_block'] for r in rows) / len(rows):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-perp")
    parser.add_argument("--recon-steps", type=int, default=16)
    parser.add_argument("--recon-lr", type=float, default=1e-2)
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
        done = {(r["method"], r["target"], r["subsets"]) for r in results}
        todo = [cell for cell in cells() if cell not in done][: args.limit]
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
