"""How far the bfloat16 Gram is from the float32 Gram of the same bfloat16 inputs, against what the damping covers.

    python tools/gram_precision.py [--windows 16] [--blocks 0 11]

SmolLM2 in bfloat16, the first windows × 512 tokens of WikiText-2 valid; for each distinct input of every block
(the adapter's `by_input`: q/k/v, o_proj, gate/up, down_proj) both Grams are accumulated (methods/statistics.Gram)
and compared, all in units of the exact Gram's mean diagonal (the damping is 0.01 of it): its spectral norm ‖H‖, the
bfloat16 Gram's error ‖E‖ and the smallest eigenvalue of the bfloat16 Gram. Inputs whose smallest eigenvalue is
below −0.005 are printed, and every input of --blocks. A smallest eigenvalue below −0.01 means the 1% damping cannot
make it positive definite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from methods.statistics import Gram  # noqa: E402
from streamer.adapters import adapter_for  # noqa: E402
from streamer.data import DATA_DIR, evaluation_windows, load_text, load_tokenizer, tokenize  # noqa: E402
from tools.bench_stream import SMOLLM2, ensure_smollm2  # noqa: E402

SEQLEN = 512


def accumulate(model, windows: torch.Tensor) -> dict[tuple[int, str], dict[str, Gram]]:
    """Both Grams of every distinct input of every block (its first reader's), fed by hooks while the model runs
    over `windows`."""
    adapter = adapter_for(model.config.to_dict())
    grams: dict[tuple[int, str], dict[str, Gram]] = {}
    hooks = []

    def feed(pair: dict[str, Gram], inputs: torch.Tensor) -> None:
        for gram in pair.values():
            gram.update(inputs)

    for index, block in enumerate(model.get_submodule(adapter.blocks)):
        for name, *_ in adapter.by_input(adapter.linear_names):
            layer = block.get_submodule(name)
            pair = grams[(index, name)] = {kind: Gram(layer, kind) for kind in ("float32", "bfloat16")}
            hooks.append(layer.register_forward_pre_hook(lambda _, args, pair=pair: feed(pair, args[0])))
    with torch.no_grad():
        for part in windows.split(4):
            model(part)
    for hook in hooks:
        hook.remove()
    return grams


def main() -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--blocks", type=int, nargs="*", default=[0, 11])
    args = parser.parse_args()
    ensure_smollm2()
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.bfloat16).eval()
    ids = tokenize(load_tokenizer(SMOLLM2), load_text(DATA_DIR / "wikitext2-valid.tokens"))
    windows = evaluation_windows(ids, SEQLEN, args.windows)
    print(f"{'input':24s} {'|H|':>8s} {'|E|':>8s} {'lambda_min':>10s}   (units of the mean diagonal)")
    for (index, name), pair in accumulate(model, windows).items():
        exact, low = pair["float32"].gram.double(), pair["bfloat16"].gram.double()
        mean = exact.diagonal().mean()
        smallest = float(torch.linalg.eigvalsh(low)[0] / mean)
        if smallest < -0.005 or index in args.blocks:
            print(f"{index:2d}.{name:21s} {float(torch.linalg.matrix_norm(exact, 2) / mean):8.1f} "
                  f"{float(torch.linalg.matrix_norm(low - exact, 2) / mean):8.4f} {smallest:+10.4f}")


if __name__ == "__main__":
    main()
