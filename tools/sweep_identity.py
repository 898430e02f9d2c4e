"""Bit-identity check for changes to the OBS sweep: save every output of sparsegpt, gptq and the score pass on a set
of random layers with one version of the code, compare them with `torch.equal` under another.

    python tools/sweep_identity.py save runs/sweep-identity.pt       # with the code before the change
    python tools/sweep_identity.py compare runs/sweep-identity.pt    # with the code after it

Covers unstructured and 2:4 pruning, joint pruning and quantization (per row, in groups, act-order weight and
group), GPTQ alone (the same grids, asymmetric, groups that cross a block boundary or end in a smaller group), layers
with dead inputs and bfloat16 layers (scales rounded to the layer's dtype), the score pass's sweep losses, and rtn (which fits its
grids with the same code).
Run it with the same torch and thread count both times: the outputs are bit-identical only on the same machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from methods.base import Target  # noqa: E402
from methods.gptq import GPTQ  # noqa: E402
from methods.quant import QuantSpec  # noqa: E402
from methods.rtn import RTN  # noqa: E402
from methods.scores import score_layer  # noqa: E402
from methods.sparsegpt import SparseGPT  # noqa: E402
from methods.statistics import Gram  # noqa: E402

# (rows, columns, dtype, dead inputs, seed): 256 columns are two blocks of 128; 200 end in a partial block
LAYERS = {
    "96x256": (96, 256, torch.float32, 0, 0),
    "96x256-dead": (96, 256, torch.float32, 5, 1),
    "64x200-bf16": (64, 200, torch.bfloat16, 3, 2),
}
SPARSE = {"s50": Target(sparsity=0.5), "s70": Target(sparsity=0.7), "2:4": Target(pattern=(2, 4))}
GRIDS = {
    "w4": QuantSpec(4),
    "w4-asym": QuantSpec(4, symmetric=False),
    "w4g32": QuantSpec(4, 32),
    "w3g96-asym": QuantSpec(3, 96, symmetric=False),  # groups cross the block boundary; 200 = 2 x 96 + 8
    "w4g32-actw": QuantSpec(4, 32, act_order="weight"),
    "w4g32-actg": QuantSpec(4, 32, act_order="group"),
    "w4-act": QuantSpec(4, act_order="weight"),
}


def make_layer(rows: int, columns: int, dtype: torch.dtype, dead: int, seed: int) -> tuple[nn.Linear, Gram]:
    """A random layer and the Gram of correlated, unevenly scaled inputs with `dead` never-active features."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(columns, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, columns, generator=generator) / columns**0.5)
    layer = layer.to(dtype)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    inputs = (torch.randn(1024, columns, generator=generator) @ mixing) * (torch.rand(columns, generator=generator) * 3)
    inputs[:, :dead] = 0.0
    gram = Gram(layer)
    for part in inputs.to(dtype).split(256):
        gram.update(part)
    return layer, gram


def cases() -> dict[str, object]:
    """Every output, by name: weights, masks, grid integers, scales, zero points, g_idx, losses, damping."""
    out: dict[str, object] = {}
    for layer_name, shape in LAYERS.items():
        layer, gram = make_layer(*shape)
        out[f"{layer_name}/gram"] = gram.gram.clone()
        targets = {**SPARSE, **{f"s50+{g}": Target(0.5, quant=spec) for g, spec in GRIDS.items()},
                   "2:4+w4g32": Target(pattern=(2, 4), quant=GRIDS["w4g32"])}
        methods: list[tuple[str, object, dict[str, Target]]] = [
            ("sparsegpt", SparseGPT(), targets),
            ("sparsegpt-b64", SparseGPT(blocksize=64), {"s50+w4g32": targets["s50+w4g32"], "2:4": targets["2:4"]}),
            ("gptq", GPTQ(), {g: Target(quant=spec) for g, spec in GRIDS.items()}),
            ("gptq-b64", GPTQ(blocksize=64), {"w3g96-asym": Target(quant=GRIDS["w3g96-asym"])}),
            ("rtn", RTN(), {g: Target(quant=spec) for g, spec in GRIDS.items() if spec.act_order is None}),
        ]
        for method_name, method, method_targets in methods:
            for target_name, target in method_targets.items():
                result = method.compress(layer, gram, target)
                key = f"{layer_name}/{method_name}/{target_name}"
                out[f"{key}/weight"] = result.weight
                out[f"{key}/mask"] = result.mask
                out[f"{key}/info"] = dict(result.info)
                if result.quant is not None:
                    for part in ("ints", "scale", "zero", "g_idx"):
                        out[f"{key}/{part}"] = getattr(result.quant, part)
        score = score_layer(layer, gram, (0.5, 0.7), 0.01, 128, keep_pruned=False)
        out[f"{layer_name}/scores"] = {"obs_loss": score.obs_loss, "saliency": score.saliency}
    return out


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("save", "compare"))
    parser.add_argument("path", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    outputs = cases()
    if args.action == "save":
        args.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(outputs, args.path)
        print(f"saved {len(outputs)} outputs to {args.path}")
        return 0
    saved = torch.load(args.path)
    differing = [name for name in saved if name not in outputs or not same(saved[name], outputs[name])]
    for name in differing:
        print(f"differs: {name}: {saved[name] if not isinstance(saved[name], torch.Tensor) else ''}"
              f" -> {outputs.get(name) if not isinstance(outputs.get(name), torch.Tensor) else ''}")
    print(f"{len(saved) - len(differing)} of {len(saved)} outputs bit-identical")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
