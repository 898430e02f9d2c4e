"""Quantization benchmark on SmolLM2-135M: perplexity and bytes on disk of rtn, gptq and joint sparsegpt.

The project's quality protocol: calibration 32 random windows x 512 tokens of WikiText-2 valid (seed 0), perplexity
on the first 32 windows x 512 tokens of WikiText-2 test. Every run is the main.py command a user would type; packed
and sparse outputs are evaluated as they are (eval decodes them block by block, bit for bit the dense weights).
Finished runs and evaluations are kept in WORKDIR and not redone, so an interrupted benchmark resumes.

    python tools/bench_quant.py [--model checkpoints/smollm2-135m] [--workdir runs/bench_quant] [--only NAME ...]

On a machine shared with other jobs, run it with OMP_NUM_THREADS=1: torch's thread pool, fighting other processes
for the cores, made the column sweep twenty times slower in our measurements.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamer.checkpoint import Checkpoint  # noqa: E402

PROTOCOL = ["--seqlen", "512"]
CALIBRATION = ["--nsamples", "32", "--seed", "0"]
EVALUATION = ["--windows", "32"]
W4G128 = ["--wbits", "4", "--groupsize", "128"]
ORDERED = ["--act-order", "--true-sequential"]  # GPTQ's advice for Llama models; SmolLM2 needs it (README)

# name -> compress options. SmolLM2's hidden size 576 is not a multiple of 128, which compressed-tensors' packed
# layout needs, so the packed size is measured with groups of 64 (576 = 9 x 64).
RUNS: dict[str, list[str]] = {
    "rtn-w4-g128": ["--method", "rtn", *W4G128],
    "gptq-w4-g128": ["--method", "gptq", *W4G128],
    "gptq-w4-g128-ordered": ["--method", "gptq", *W4G128, *ORDERED],
    "gptq-w4-g64-packed": ["--method", "gptq", "--wbits", "4", "--groupsize", "64", "--format", "packed"],
    "gptq-w4-g64-packed-ordered": ["--method", "gptq", "--wbits", "4", "--groupsize", "64", "--format", "packed",
                                   *ORDERED],
    "gptq-w3-g128-ordered": ["--method", "gptq", "--wbits", "3", "--groupsize", "128", *ORDERED],
    "sparsegpt-50-sparse": ["--method", "sparsegpt", "--sparsity", "0.5", "--format", "sparse"],
    "sparsegpt-50-w4-g128-sparse": ["--method", "sparsegpt", "--sparsity", "0.5", *W4G128, "--format", "sparse"],
    "sparsegpt-70-w4-g128-sparse": ["--method", "sparsegpt", "--sparsity", "0.7", *W4G128, "--format", "sparse"],
}


def main_py(*argv: str) -> str:
    """Run one main.py command in a fresh process, echoed on stderr as the command that reproduces it; return its
    standard output."""
    print("$ python main.py " + shlex.join(argv), file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "-q", *argv], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"main.py {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def disk_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def fp16_bytes(directory: Path) -> int:
    """Tensor bytes of the checkpoint held in float16 (what a dense half-precision copy stores)."""
    total = 0
    for entry in Checkpoint(directory).entries.values():
        numel = 1
        for dim in entry.shape:
            numel *= dim
        total += numel * (2 if entry.dtype.is_floating_point else entry.dtype.itemsize)
    return total


def perplexity(model: Path) -> float:
    """WikiText-2 perplexity of `model` under the quality protocol."""
    output = main_py("eval", "--model", str(model), "--device", "cpu", *PROTOCOL, *EVALUATION)
    return json.loads(output.splitlines()[-1])["ppl"]


def bench_arguments(description: str, workdir: str, runs: dict) -> argparse.Namespace:
    """--model, --workdir (created) and --only of a benchmark over `runs`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "smollm2-135m")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / workdir)
    parser.add_argument("--only", nargs="*", choices=sorted(runs), default=None, help="run only these")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def main() -> None:
    args = bench_arguments(__doc__, "bench_quant", RUNS)
    results_path = args.workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2))

    if "dense" not in results:
        results["dense"] = {"ppl": perplexity(args.model), "bytes": disk_bytes(args.model),
                            "fp16_bytes": fp16_bytes(args.model)}
        save()
    for name in args.only or RUNS:
        if name in results:
            continue
        out = args.workdir / name
        started = time.perf_counter()
        main_py("compress", "--model", str(args.model), "--out", str(out), "--device", "cpu",
                *RUNS[name], *PROTOCOL, *CALIBRATION)
        seconds = time.perf_counter() - started
        results[name] = {"ppl": perplexity(out), "bytes": disk_bytes(out), "compress_seconds": round(seconds, 1),
                         "options": " ".join(RUNS[name])}
        save()
        print(f"{name}: {json.dumps(results[name])}", flush=True)

    dense = results["dense"]
    print("\n| run | ppl | bytes on disk | vs fp32 | vs fp16 |\n|---|---|---|---|---|")
    print(f"| dense fp32 | {dense['ppl']:.2f} | {dense['bytes']:,} | 1.00 | {dense['bytes'] / dense['fp16_bytes']:.2f} |")
    print(f"| dense fp16 (computed) | - | {dense['fp16_bytes']:,} | {dense['fp16_bytes'] / dense['bytes']:.2f} | 1.00 |")
    for name, row in results.items():
        if name != "dense":
            print(f"| {name} | {row['ppl']:.2f} | {row['bytes']:,} | {row['bytes'] / dense['bytes']:.2f} | "
                  f"{row['bytes'] / dense['fp16_bytes']:.2f} |")


if __name__ == "__main__":
    main()
