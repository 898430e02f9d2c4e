"""One process against a torchrun job of two on the same CPU cores: SmolLM2, SparseGPT 50%, 32 x 512 calibration.

    python tools/bench_distributed.py [--out runs/bench-distributed] [--ranks 2] [--threads 2] [--nsamples 32]

world 1: `main.py compress` with --threads torch threads; world N: `torchrun --nproc-per-node N main.py compress`
with threads / N each (the same cores in all). For each: wall time, per-phase seconds per block (rank 0's journal),
peak RSS of every process (its own VmHWM at exit), WikiText-2 perplexity of the output (the quality protocol);
then world N against world 1: largest weight difference, mask agreement. Results in OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.bench_stream import (  # noqa: E402
    LAUNCHER, PEAK_LINE, PROTOCOL_CALIBRATION, SMOLLM2, ensure_smollm2, eval_ppl, journal, phase_shares, run_measured,
)


def compress(out: Path, ranks: int, threads: int, nsamples: int) -> dict:
    """Compress SmolLM2 into `out` with `ranks` processes of `threads` threads each, calibrated on `nsamples`
    windows of the protocol's 512 tokens; the figures of that run."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # torchrun passes it on (it would set 1 itself when unset)
    argv = ["-q", "compress", "--model", str(SMOLLM2), "--out", str(out), "--method", "sparsegpt", "--sparsity", "0.5",
            "--device", "cpu", "--restart", *PROTOCOL_CALIBRATION, "--nsamples", str(nsamples)]
    if ranks == 1:
        run = run_measured(argv, niceness=10)
    else:
        import torch.distributed.run as launcher

        # each rank runs under the peak-printing launcher; the last peak line is the agent's own
        run = run_measured(["--standalone", "--nproc-per-node", str(ranks), "--no-python", sys.executable, "-c",
                            LAUNCHER, "main.py", *argv], niceness=10, script=launcher.__file__)
    peaks = [int(kib) / 1024 for kib in re.findall(re.escape(PEAK_LINE) + r"(\d+)", run["output"])]
    body = journal(out)
    return {
        "ranks": ranks, "threads_per_rank": threads, "wall_seconds": run["seconds"],
        "peak_rss_mib_of_each_rank": peaks[:ranks], "ppl": eval_ppl(out), **phase_shares(body),
    }


def compare(one: Path, other: Path) -> dict:
    """Largest absolute weight difference and the share of pruning decisions (zero or not) that agree."""
    import torch
    from safetensors.torch import load_file

    def weights(out: Path) -> dict[str, torch.Tensor]:
        loaded = {}
        for shard in sorted(out.glob("*.safetensors")):
            loaded.update(load_file(shard))
        return {name: tensor for name, tensor in loaded.items() if name.endswith("proj.weight")}

    first, second = weights(one), weights(other)
    agree = sum(int(((first[n] == 0) == (second[n] == 0)).sum()) for n in first)
    total = sum(first[n].numel() for n in first)
    return {
        "max_weight_difference": max(float((first[n] - second[n]).abs().max()) for n in first),
        "mask_agreement": agree / total,
        "layers": len(first),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-distributed")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all (default: 2, this machine's)")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (default: 32, the protocol's)")
    args = parser.parse_args()
    ensure_smollm2()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for ranks in (1, args.ranks):
        results[f"world {ranks}"] = compress(args.out / f"world-{ranks}", ranks, max(1, args.threads // ranks),
                                              args.nsamples)
        print(json.dumps(results[f"world {ranks}"]), flush=True)
    results["world {} against world 1".format(args.ranks)] = compare(args.out / "world-1",
                                                                       args.out / f"world-{args.ranks}")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
