"""Per-window reconstruction errors: how each calibration window's block output error moves when a block is trained.

The journal reports a block's output MSE before and after reconstruction on a few leading windows (a full pass per
block costs too much in a real run). This diagnosis runs `main.py compress` as given, measures chosen blocks' error on
every calibration window before and after training, prints them and stops after the last chosen block (its output
directory is left unfinished: a scratch run). It found that SmolLM2's windows differ 70x in one block's error and that
training trades them (README, "Reconstruction (PERP) on SparseGPT / Wanda").

    python tools/reconstruction_windows.py --blocks 12 -- --model M --out SCRATCH --method sparsegpt --sparsity 0.7 \\
        --reconstruct biases,norms,masklora --seqlen 512 --nsamples 32 --device cpu [--recon-lr 5e-4 ...]

--blocks counts from 1, as the log does, the blocks this run trains: give a fresh SCRATCH (or --restart), since a
resumed run would start counting at its first unfinished block.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import main  # noqa: E402
import streamer.block  # noqa: E402


def window_errors(run_block, batches) -> list[float]:
    """Each window's output MSE against its dense target (micro-batches split into their windows)."""
    errors = []
    with torch.no_grad():
        for inputs, targets in batches:
            outputs = run_block(inputs).float()
            errors += [nn.functional.mse_loss(o, t.float()).item() for o, t in zip(outputs, targets)]
    return errors


def report(block: int, before: list[float], after: list[float]) -> None:
    worse = sum(a > b for a, b in zip(after, before))
    print(f"block {block}: mean output MSE over {len(before)} windows {sum(before) / len(before):.4g} -> "
          f"{sum(after) / len(after):.4g}; {worse} windows worse, {len(before) - worse} better; "
          f"error spread {max(before) / min(before):.0f}x before")
    print("| window | before | after |\n| --- | --- | --- |")
    for index, (b, a) in enumerate(zip(before, after)):
        print(f"| {index} | {b:.4g} | {a:.4g}{' (worse)' if a > b else ''} |")
    sys.stdout.flush()


def diagnose(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", required=True, help="blocks to measure, counted from 1")
    parser.add_argument("compress", nargs=argparse.REMAINDER, help="-- then main.py compress's own options")
    args = parser.parse_args(argv)
    compress = [word for word in args.compress if word != "--"]
    chosen, last = set(args.blocks), max(args.blocks)
    train = streamer.block.reconstruct
    counter = iter(range(1, 1 << 30))

    def measured(block, linears, norms, run_block, batches, settings, generator, average_gradients=None):
        number = next(counter)
        before = window_errors(run_block, batches) if number in chosen else []
        result = train(block, linears, norms, run_block, batches, settings, generator, average_gradients)
        if number in chosen:
            report(number, before, window_errors(run_block, batches))
            if number == last:
                os._exit(0)  # a scratch run: nothing after the last chosen block is wanted
        return result

    streamer.block.reconstruct = measured
    print("$ python main.py compress " + shlex.join(compress), file=sys.stderr)
    return main.main(["compress", *compress])


if __name__ == "__main__":
    sys.exit(diagnose(sys.argv[1:]))
