"""Our SparseGPT against the reference implementation (IST-DASLab/sparsegpt), in one sitting, on the same windows.

    git clone https://github.com/IST-DASLab/sparsegpt REF     # not bundled: the reference's code is not ours
    python tools/bench_reference.py --reference REF [--out runs/reference]

Two runs on SmolLM2 (SparseGPT 50%, the quality protocol's calibration: 32 windows x 512 tokens of WikiText-2
valid, seed 0), each in its own process measured from outside (wall time, peak RSS from wait4), then both outputs
evaluated by `main.py eval` on the protocol's windows:

  reference  its own `llama_sequential` and `SparseGPT` class, imported from REF, on the whole model loaded into RAM
             with `LlamaForCausalLM.from_pretrained` (as its llama.py does), then saved with save_pretrained;
  ours       `main.py compress` with the same settings.

What the reference needs to run here, all done from outside its files: its module globals (`args`, which its loop
reads; the model's `seqlen`), our calibration windows in its loader's format (it would download WikiText-2 train),
`torch.cuda.synchronize` made a no-op on a CPU-only torch, and rotary position embeddings handed to each decoder
layer (its loop passes only the attention mask, which today's transformers layers no longer accept alone). The
time measured for each is the whole process: imports, loading, calibration, pruning and saving.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.bench_stream import (  # noqa: E402
    PROTOCOL_CALIBRATION, SMOLLM2, ensure_smollm2, eval_ppl, predicted_peak, run_measured,
)

NSAMPLES, SEQLEN, SPARSITY = 32, 512, 0.5


def rotary_for_layers(model) -> None:
    """Let the model's decoder layers make their own rotary embeddings when a caller passes none."""
    import torch

    rotary = model.model.rotary_emb
    layer_class = type(model.model.layers[0])
    forward = layer_class.forward

    def with_rotary(self, hidden_states, *args, **kwargs):
        if kwargs.get("position_embeddings") is None:
            positions = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
            kwargs["position_embeddings"] = rotary(hidden_states, positions)
        return forward(self, hidden_states, *args, **kwargs)

    layer_class.forward = with_rotary


def reference_child(reference: Path, out: Path) -> None:
    """In this process: prune SmolLM2 with the reference's loop and class, save the result to `out`."""
    import torch

    torch.cuda.synchronize = lambda *args, **kwargs: None  # the reference calls it after each layer
    sys.path.insert(0, str(reference))
    import llama  # the reference's module: it star-imports its sparsegpt, modelutils and quant modules

    from streamer.checkpoint import Checkpoint
    from streamer.data import CalibrationOptions
    from streamer.writer import copy_side_files

    started = time.perf_counter()
    model = llama.get_llama(str(SMOLLM2))
    model.eval()
    model.seqlen = SEQLEN
    rotary_for_layers(model)
    windows = CalibrationOptions(nsamples=NSAMPLES, seqlen=SEQLEN, seed=0).load(SMOLLM2, Checkpoint(SMOLLM2).config)
    dataloader = [(window.unsqueeze(0), None) for window in windows.windows]
    llama.args = argparse.Namespace(
        nsamples=NSAMPLES, sparsity=SPARSITY, prunen=0, prunem=0, percdamp=0.01, blocksize=128, wbits=16,
        minlayer=-1, maxlayer=1000, prune_only="", invert=False, true_sequential=False,
    )
    llama.llama_sequential(model, dataloader, torch.device("cpu"))
    pruned = time.perf_counter() - started
    model.save_pretrained(out)
    copy_side_files(SMOLLM2, out)  # the tokenizer, as compress copies it to its outputs
    print(json.dumps({"load_calibrate_prune_seconds": pruned}))


def bench(reference: Path, out: Path) -> dict:
    ensure_smollm2()
    reference_out, ours_out = out / "smollm2-reference-sparsegpt50", out / "smollm2-ours-sparsegpt50"
    runs = {
        "reference": run_measured(["child", "--reference", str(reference), "--out", str(reference_out)],
                                  script="tools/bench_reference.py"),
        "ours": run_measured(["compress", "--model", str(SMOLLM2), "--out", str(ours_out), "--method", "sparsegpt",
                              "--sparsity", str(SPARSITY), "--device", "cpu", *PROTOCOL_CALIBRATION, "--restart"]),
    }
    results = {}
    for name, directory in (("reference", reference_out), ("ours", ours_out)):
        run = runs[name]
        results[name] = {"seconds": run["seconds"], "peak_rss_mib": run["peak_rss_mib"], "ppl": eval_ppl(directory)}
        print(f"{name:10s} {run['seconds']:7.1f} s  peak RSS {run['peak_rss_mib']:7.0f} MiB  "
              f"ppl {results[name]['ppl']:.2f}", flush=True)
    planned = predicted_peak(runs["ours"]["output"]) / 2**20
    results["ours"]["planned_peak_mib"] = planned
    print(f"ours: the plan predicted {planned:.0f} MiB, {planned / runs['ours']['peak_rss_mib'] - 1:+.1%} of the peak")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=("bench", "child"), default="bench",
                        help="bench (default); child is the reference run's own process")
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of IST-DASLab/sparsegpt")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reference")
    args = parser.parse_args()
    if not (args.reference / "llama.py").is_file() or not (args.reference / "sparsegpt.py").is_file():
        sys.exit(f"{args.reference} is not a checkout of IST-DASLab/sparsegpt (no llama.py and sparsegpt.py)")
    if args.command == "child":
        reference_child(args.reference.resolve(), args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = bench(args.reference.resolve(), args.out)
    (args.out / "reference.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
