"""CPTQuant benchmark on SmolLM2-135M: uniform GPTQ at 4 and 5 bits against each bits policy at an average of 5.

The project's quality protocol (calibration 32 x 512 tokens of WikiText-2 valid, seed 0; perplexity on the first
32 windows x 512 tokens of WikiText-2 test). Every output is written packed (compressed-tensors, groups of 64: 576 =
9 x 64), so bytes on disk are the real size. One score pass (probe sparsity 0.5, for PMPQ) serves all policies. For
each policy the table says which layers got 8 bits and which share of those weights lies in the first and last 30%
of the blocks (the paper finds those most sensitive). Finished steps are kept in WORKDIR and not redone.

    python tools/bench_cptq.py [--model checkpoints/smollm2-135m] [--workdir runs/bench-cptq] [--only NAME ...]

Run it with OMP_NUM_THREADS=1 on a shared machine (see tools/bench_quant.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.bench_quant import CALIBRATION, PROTOCOL, bench_arguments, disk_bytes, main_py, perplexity  # noqa: E402

GRID = ["--method", "gptq", "--groupsize", "64", "--format", "packed"]
POLICY = ["--avg-bits", "5", "--bit-choices", "4,8"]
RUNS: dict[str, list[str]] = {
    "gptq-w4-g64": [*GRID, "--wbits", "4"],
    "gptq-w5-g64": [*GRID, "--wbits", "5"],
    **{f"{policy}-avg5": [*GRID, "--bits-policy", policy, *POLICY]
       for policy in ("cmpq", "cmpq-noise", "pmpq", "tdmpq")},
}
EDGE = 0.3  # the paper's "first and last 30% of layers"


def high_bit_layers(out: Path, blocks: int) -> dict | None:
    """Which layers a policy gave more than its lowest width, and their weights' share in the edge blocks."""
    record = json.loads((out / "config.json").read_text())["layerpress"]
    if "layer_bits" not in record:
        return None
    bits, params = record["layer_bits"], json.loads((out.parent / "scores" / "scores.json").read_text())["layers"]
    high = [name for name, b in bits.items() if b > min(bits.values())]
    edge = [name for name in high if not EDGE * blocks <= params[name]["block"] < (1 - EDGE) * blocks]
    weight = lambda names: sum(params[name]["params"] for name in names)  # noqa: E731
    return {
        "achieved_avg_bits": record["bits_policy"]["achieved_avg_bits"],
        "layers": [[params[name]["block"], params[name]["linear"]] for name in high],
        "edge_share": weight(edge) / max(weight(high), 1),
        "edge_share_by_count": len(edge) / max(len(high), 1),
    }


def main() -> None:
    args = bench_arguments(__doc__, "bench-cptq", RUNS)
    results_path = args.workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    blocks = json.loads((args.model / "config.json").read_text())["num_hidden_layers"]

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2))

    if "dense" not in results:
        results["dense"] = {"ppl": perplexity(args.model), "bytes": disk_bytes(args.model)}
        save()
    scores = args.workdir / "scores"
    main_py("scores", "--model", str(args.model), "--out", str(scores), "--device", "cpu", "--sparsity", "0.5",
            *PROTOCOL, *CALIBRATION)
    for name in args.only or RUNS:
        if name in results:
            continue
        out, options = args.workdir / name, RUNS[name]
        if "--bits-policy" in options:
            options = [*options, "--scores", str(scores)]
        started = time.perf_counter()
        main_py("compress", "--model", str(args.model), "--out", str(out), "--device", "cpu", *options, *PROTOCOL,
                *CALIBRATION)
        results[name] = {"ppl": perplexity(out), "bytes": disk_bytes(out),
                         "compress_seconds": round(time.perf_counter() - started, 1), "options": " ".join(options),
                         "high_bits": high_bit_layers(out, blocks)}
        save()
        print(f"{name}: ppl {results[name]['ppl']:.2f}, {results[name]['bytes']:,} bytes", flush=True)
    (args.workdir / "results.md").write_text(report(results, blocks))
    print(report(results, blocks))


def report(results: dict, blocks: int) -> str:
    lines = ["| run | avg bits | ppl | bytes on disk | 8-bit layers | their weights in first/last 30% of blocks |",
             "|---|---|---|---|---|---|"]
    for name, row in results.items():
        high = row.get("high_bits")
        bits = f"{high['achieved_avg_bits']:.3f}" if high else ("-" if name == "dense" else name.split("-")[1][1:])
        detail = (f"{len(high['layers'])} | {100 * high['edge_share']:.0f}% ({100 * high['edge_share_by_count']:.0f}% "
                  "by count)") if high else "- | -"
        lines.append(f"| {name} | {bits} | {row['ppl']:.2f} | {row['bytes']:,} | {detail} |")
    lines.append(f"\nFirst/last {EDGE:.0%} of {blocks} blocks = blocks < {EDGE * blocks:g} or >= {(1 - EDGE) * blocks:g} "
                 f"({2 * EDGE:.0%} of the weights: the share a depth-blind choice would give).\n")
    for name, row in results.items():
        if row.get("high_bits"):
            layers = ", ".join(f"{block}.{linear}" for block, linear in sorted(row["high_bits"]["layers"]))
            lines.append(f"- {name} 8-bit layers (block.linear): {layers}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
