"""The main job on the bundled model: convert SmolLM2-135M once, prune it with SparseGPT, compare perplexities.

Runs the same commands a user would (main.py compress / eval) with the project's quality protocol: calibration
32 random windows x 512 tokens of WikiText-2 valid (seed 0), evaluation on the first 32 windows x 512 of
WikiText-2 test.

    python tools/smollm2_demo.py [--method sparsegpt] [--sparsity 0.5] [--workdir checkpoints]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import main  # noqa: E402
from tools.convert_gguf import bundled_smollm2, convert  # noqa: E402

PROTOCOL = ["--seqlen", "512"]
CALIBRATION = ["--nsamples", "32", "--seed", "0"]
EVALUATION = ["--windows", "32"]


def cli(*argv: str) -> str:
    """Run one main.py command in this process, echoed on stderr as the command that reproduces it; return its
    standard output."""
    print("$ python main.py " + shlex.join(argv), file=sys.stderr, flush=True)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        code = main.main(list(argv))
    if code:
        sys.exit(code)
    return captured.getvalue()


def perplexity(model: Path, device: str) -> float:
    return json.loads(cli("eval", "--model", str(model), "--device", device, *PROTOCOL, *EVALUATION).splitlines()[-1])[
        "ppl"
    ]


def main_job() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--workdir", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    dense = args.workdir / "smollm2-135m"
    convert(bundled_smollm2(), dense, torch.float32, "100MB")
    pruned = args.workdir / f"smollm2-135m-{args.method}-{args.sparsity}"
    cli("compress", "--model", str(dense), "--out", str(pruned), "--method", args.method,
        "--sparsity", args.sparsity, "--device", args.device, *PROTOCOL, *CALIBRATION)
    dense_ppl, pruned_ppl = perplexity(dense, args.device), perplexity(pruned, args.device)
    print(f"SmolLM2-135M WikiText-2 perplexity (32 x 512 windows): dense {dense_ppl:.2f}, "
          f"{args.method} {float(args.sparsity):.0%} {pruned_ppl:.2f}")
    print(json.dumps({"dense_ppl": dense_ppl, "compressed_ppl": pruned_ppl, "method": args.method,
                      "sparsity": float(args.sparsity), "output": str(pruned)}))


if __name__ == "__main__":
    main_job()
