"""GBLM-Pruner on SmolLM2-135M: how much the gradient term adds to Wanda's, over α and the number of windows.

For each calibration size N (windows of 512 tokens of WikiText-2 valid, seed 0) one gradient pass, then
`compress --method gblm --alpha A` for every α at the given sparsity, each evaluated with the project's protocol
(first 32 windows x 512 of WikiText-2 test). α = 0 ranks as Wanda does (the √N scaling of the activation term is
the same for every weight of a row), so it is each calibration size's Wanda baseline on the same windows.

    python tools/bench_gblm.py [--alphas 0 10 100 1000] [--nsamples 32] [--sparsity 0.5] [--workdir runs/bench-gblm]

Finished gradient passes and compress runs are skipped; results (with the commands that made them) in
WORKDIR/results.json, a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.smollm2_demo import PROTOCOL, cli, perplexity  # noqa: E402




def main_job() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "smollm2-135m")
    parser.add_argument("--alphas", nargs="+", default=["0", "10", "100", "1000"])
    parser.add_argument("--nsamples", type=int, nargs="+", default=[32], help="calibration windows (gradients too)")
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-gblm")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    results_path = args.workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for nsamples in args.nsamples:
        calibration = ["--model", str(args.model), *PROTOCOL, "--nsamples", str(nsamples), "--seed", "0",
                       "--device", args.device]
        gradients = args.workdir / f"gradients-{nsamples}"
        cli("-q", "gradients", *calibration, "--out", str(gradients))
        for alpha in args.alphas:
            key = f"n{nsamples} alpha {alpha}"
            out = args.workdir / f"gblm-{nsamples}-{alpha}-{args.sparsity}"
            command = ["compress", *calibration, "--out", str(out), "--method", "gblm", "--alpha", alpha,
                       "--sparsity", args.sparsity, "--gradients", str(gradients)]
            if key not in results:
                cli("-q", *command)
                results[key] = {"nsamples": nsamples, "alpha": float(alpha), "sparsity": float(args.sparsity),
                                "ppl": perplexity(out, args.device), "command": "python main.py " + shlex.join(command)}
                args.workdir.mkdir(parents=True, exist_ok=True)
                results_path.write_text(json.dumps(results, indent=2))
            print(f"{key:24s} ppl {results[key]['ppl']:8.2f}", flush=True)


if __name__ == "__main__":
    main_job()
