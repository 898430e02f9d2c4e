"""The prepared device check: does the CUDA path give what the CPU path gives, within the plan, and how fast?

    python tools/gpu_check.py --device cuda            # on a GPU machine: under 8 minutes on one GPU
    python tools/gpu_check.py --device cpu --quick     # its self-test here (the same code paths, smaller runs)

1. Tiny random OPT, BLOOM and Llama checkpoints compressed by SparseGPT 50% on --device and on the CPU, from the
   same calibration windows: largest weight difference, mask agreement, identical tensor names and shapes.
2. SmolLM2-135M (the bundled model) on --device: SparseGPT 50%, GPTQ w4 g128 act-order, SparseGPT 50% with
   --reconstruct biases,norms,masklora: wall time, the device peak measured per block against the plan's, and
   WikiText-2 perplexity (quality protocol: 32 x 512 calibration, first 32 x 512 test windows; --quick: 8 x 128).
3. The whole-block selection of SparseGPT's sweep on --device: a top-k against the k-th value with the tie rule
   (methods/masks.py uses the k-th value on the CPU, where it is 3x faster; on a GPU the choice waits for this).
Ends with one summary table; every figure also goes to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tests.conftest import make_tiny_checkpoint, train_tokenizer  # noqa: E402
from tools.convert_gguf import bundled_smollm2, convert  # noqa: E402

TINY = ("opt", "bloom", "llama")
SMOLLM2_RUNS = {
    "sparsegpt 50%": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "gptq w4 g128 act-order": ["--method", "gptq", "--wbits", "4", "--groupsize", "128", "--act-order",
                               "--true-sequential"],
    # bfloat16 blocks: the default --gram-dtype auto is TF32 there, which on CUDA is not float32 (on a CPU it is)
    "gptq w4 g128 act-order bf16": ["--method", "gptq", "--wbits", "4", "--groupsize", "128", "--act-order",
                                    "--true-sequential", "--dtype", "bfloat16"],
    "sparsegpt 50% + reconstruct": ["--method", "sparsegpt", "--sparsity", "0.5", "--reconstruct",
                                    "biases,norms,masklora"],
}


def main_py(*argv: str) -> str:
    """Run `python main.py ARGV` in its own process; its standard output (a failure stops the check, loudly)."""
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "-q", *argv], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"gpu_check: main.py {' '.join(argv)} failed:\n{result.stderr[-4000:]}")
    return result.stdout


def load_output(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(directory / shard))
    return state


def compare(on_device: Path, on_cpu: Path) -> dict[str, float]:
    """Largest weight difference and the share of pruned positions both runs agree on."""
    device_state, cpu_state = load_output(on_device), load_output(on_cpu)
    if device_state.keys() != cpu_state.keys() or any(device_state[k].shape != cpu_state[k].shape for k in cpu_state):
        sys.exit(f"gpu_check: {on_device} and {on_cpu} hold different tensors")
    record = json.loads((on_cpu / "config.json").read_text())["layerpress"]
    compressed = {f"{layer}.weight" for layer in record["layer_sparsity"]}
    largest, agree, total = 0.0, 0, 0
    for name, expected in cpu_state.items():
        got = device_state[name]
        if expected.is_floating_point():
            largest = max(largest, (got.double() - expected.double()).abs().max().item())
        if name in compressed:
            agree += int(((got == 0) == (expected == 0)).sum())
            total += expected.numel()
    if total == 0:
        sys.exit(f"gpu_check: no compressed layer of {on_cpu} found by the names its record gives")
    return {"max_weight_difference": largest, "mask_agreement": agree / max(total, 1)}


def journal(out: Path) -> dict:
    return json.loads((out / ".layerpress" / "journal.json").read_text())["body"]


def tiny_checks(device: str, work: Path) -> list[dict]:
    tokenizer = train_tokenizer(work / "tokenizer")
    calib = work / "calib.txt"
    calib.write_text((ROOT / "data" / "wikitext2-valid.tokens").read_text(encoding="utf-8")[:50_000])
    rows = []
    for family in TINY:
        model = make_tiny_checkpoint(family, work / f"tiny-{family}", tokenizer)
        outs = {}
        for where in (device, "cpu"):
            outs[where] = work / f"tiny-{family}-{where}"
            main_py("compress", "--model", str(model), "--out", str(outs[where]), "--calib", str(calib),
                    "--nsamples", "8", "--seqlen", "64", "--device", where, "--method", "sparsegpt", "--restart")
        rows.append({"family": family, **compare(outs[device], outs["cpu"])})
    return rows


def smollm2_checks(device: str, work: Path, quick: bool) -> list[dict]:
    model = work / "smollm2-135m"
    convert(bundled_smollm2(), model, torch.float32, "100MB")
    nsamples, seqlen = ("8", "128") if quick else ("32", "512")
    rows = []
    for name, options in SMOLLM2_RUNS.items():
        out = work / f"smollm2-{name.split()[0]}-{len(rows)}"
        clock = time.perf_counter()
        main_py("compress", "--model", str(model), "--out", str(out), "--nsamples", nsamples, "--seqlen", seqlen,
                "--seed", "0", "--device", device, "--restart", *options)
        seconds = time.perf_counter() - clock
        peaks = journal(out).get("device_peaks", {}).values()
        evaluated = main_py("eval", "--model", str(out), "--seqlen", seqlen, "--windows", nsamples, "--device", device)
        rows.append({
            "run": name, "seconds": seconds,
            "device_peak_measured": max((p["measured"] for p in peaks), default=None),
            "device_peak_planned": max((p["planned"] or 0 for p in peaks), default=None),
            "ppl": json.loads(evaluated.splitlines()[-1])["ppl"],
        })
    return rows


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def selection_timing(device: str) -> list[dict]:
    """Milliseconds of a top-k and of `lowest_from_kth` on SparseGPT's 128-column blocks (SmolLM2's and OPT-175B's
    widest rows), 50%, the median of 20 after a warm-up."""
    from methods.masks import lowest_from_kth

    def topk(scores: torch.Tensor, count: int) -> torch.Tensor:
        mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        mask[torch.topk(scores.flatten(), count, largest=False).indices] = True
        return mask

    rows = []
    for height in (1536, 12288, 49152):
        scores = torch.rand(height, 128, device=device)
        count = scores.numel() // 2
        timing = {"rows": height}
        for name, select in (("topk", topk), ("kth", lowest_from_kth)):
            seconds = []
            for _ in range(21):
                synchronize(device)
                clock = time.perf_counter()
                select(scores, count)
                synchronize(device)
                seconds.append(time.perf_counter() - clock)
            timing[f"{name}_ms"] = 1e3 * sorted(seconds[1:])[10]
        rows.append(timing)
    return rows


def factor_timing(device: str, sizes: tuple[int, ...]) -> list[dict]:
    """Seconds of the inverse-Hessian factor two ways: the reference's three solver calls (Cholesky,
    cholesky_inverse, Cholesky of the inverse: 4n³/3 in the solver) and `inverse_cholesky` (one Cholesky of the
    reversed matrix and a triangular inverse made of matrix products), the best of 3 after a warm-up, with their
    largest relative difference. The planner assumes the second is faster on an A100 (solver 5, float32 matmul
    15 TFLOP/s): this measures it."""
    from methods.hessian import inverse_cholesky
    from streamer.planner import fastest_seconds

    def three_solver_calls(hessian: torch.Tensor) -> torch.Tensor:
        lower = torch.linalg.cholesky(hessian)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)

    rows = []
    for size in sizes:
        inputs = torch.randn(2 * size, size, device=device)
        hessian = inputs.T @ inputs / (2 * size)
        hessian.diagonal().add_(0.01 * hessian.diagonal().mean())
        timing = {"size": size}
        for name, factor in (("solver", three_solver_calls), ("products", lambda h: inverse_cholesky(h, 0.0)[0])):
            timing[f"{name}_s"] = fastest_seconds(lambda factor=factor, hessian=hessian: factor(hessian),
                                                  torch.device(device), repeats=3)
        solver, products = three_solver_calls(hessian), inverse_cholesky(hessian, 0.0)[0]
        timing["relative_difference"] = float((solver - products).abs().max() / solver.abs().max())
        rows.append(timing)
        del inputs, hessian, solver, products
    return rows


def gib(size: float | None) -> str:
    return "-" if size is None else f"{size / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the device to check against the CPU (default: cuda)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check", help="work and result directory")
    parser.add_argument("--quick", action="store_true", help="SmolLM2 on 8 x 128 windows (the CPU self-test)")
    parser.add_argument("--tiny-only", action="store_true", help="only the tiny cross-device comparison")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary = {"device": args.device, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "tiny": tiny_checks(args.device, args.out)}
    if not args.tiny_only:
        summary["smollm2"] = smollm2_checks(args.device, args.out, args.quick)
    summary["selection"] = selection_timing(args.device)
    summary["factor"] = factor_timing(args.device, (4096, 16384) if args.device.startswith("cuda") else (1024, 2048))
    summary["seconds"] = time.perf_counter() - started
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"gpu check on {args.device} ({summary['gpu'] or 'no GPU'}, torch {summary['torch']}), "
          f"{summary['seconds']:.0f} s")
    print("| tiny family | max weight difference vs cpu | mask agreement |\n| --- | --- | --- |")
    for row in summary["tiny"]:
        print(f"| {row['family']} | {row['max_weight_difference']:.3g} | {100 * row['mask_agreement']:.3f}% |")
    if "smollm2" in summary:
        print("| SmolLM2 run | seconds | device peak (measured / planned) | perplexity |\n| --- | --- | --- | --- |")
        for row in summary["smollm2"]:
            print(f"| {row['run']} | {row['seconds']:.1f} | {gib(row['device_peak_measured'])} / "
                  f"{gib(row['device_peak_planned'])} | {row['ppl']:.2f} |")
    print("| block rows x 128, 50% | top-k ms | k-th value ms |\n| --- | --- | --- |")
    for row in summary["selection"]:
        print(f"| {row['rows']} | {row['topk_ms']:.3f} | {row['kth_ms']:.3f} |")
    print("| factor of n inputs | three solver calls s | one Cholesky + products s | largest difference |\n"
          "| --- | --- | --- | --- |")
    for row in summary["factor"]:
        print(f"| {row['size']} | {row['solver_s']:.3f} | {row['products_s']:.3f} | {row['relative_difference']:.2e} |")


if __name__ == "__main__":
    main()
