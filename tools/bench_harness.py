"""lm-evaluation-harness benchmark on SmolLM2-135M: dense vs SparseGPT 50%, streamed eval vs lm-eval's HF backend.

On the local multiple-choice task (tests/tasks/layerpress_cloze_mc.yaml: 24 cloze sentences, 4 choices, 96
requests): accuracy, peak RSS of the process and seconds per 1000 requests, for each model through
`eval --tasks`'s streamed model and through lm-eval's own HF backend (the whole model in memory). Each measurement
runs in a fresh process, one thread, the same micro-batch, so that peaks and speeds compare; the RSS after the
imports (torch, transformers, lm-eval) is reported too, since it is the floor of both.

    python tools/bench_harness.py [--workdir runs/bench-harness] [--batch 16]

The SparseGPT model (calibration 16 windows x 512 tokens of WikiText-2 valid, seed 0) is compressed once into
WORKDIR and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASK = "layerpress_cloze_mc"
TASKS_DIR = ROOT / "tests" / "tasks"
SMOLLM2 = ROOT / "checkpoints" / "smollm2-135m"


def rss_mib() -> float:
    """This process's current resident memory."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure(backend: str, model: Path, batch: int) -> dict:
    """One evaluation of TASK in this process: accuracy, requests, seconds (the model's loading included), peak and
    post-import RSS."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from streamer.commands.harness import LayerpressLM, task_manager
    from streamer.stream import StreamOptions

    torch.set_num_threads(1)
    floor = rss_mib()
    manager = task_manager([TASK], TASKS_DIR)
    clock = time.perf_counter()
    if backend == "streamed":
        lm = LayerpressLM(model, StreamOptions(micro_batch=batch))
    else:
        lm = HFLM(pretrained=str(model), dtype="float32", batch_size=batch, device="cpu")
    results = simple_evaluate(model=lm, tasks=[TASK], task_manager=manager, log_samples=True)
    seconds = time.perf_counter() - clock
    metrics = results["results"][TASK]
    requests = sum(len(sample["resps"]) for sample in results["samples"][TASK])
    return {
        "acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"], "requests": requests,
        "seconds_per_1000_requests": 1000 * seconds / requests,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_imports_mib": floor,
    }


def in_fresh_process(backend: str, model: Path, batch: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISABLE_MULTIPROC": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, "--measure", backend, str(model), "--batch", str(batch)],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compressed(workdir: Path) -> Path:
    out = workdir / "sparsegpt50"
    if not (out / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, "main.py", "-q", "compress", "--model", str(SMOLLM2), "--out", str(out),
                        "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "16", "--seqlen", "512",
                        "--device", "cpu"], cwd=ROOT, check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-harness")
    parser.add_argument("--batch", type=int, default=16, help="requests per forward, both backends")
    parser.add_argument("--measure", nargs=2, metavar=("BACKEND", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]), args.batch)))
        return
    import torch

    from tools.convert_gguf import bundled_smollm2, convert

    convert(bundled_smollm2(), SMOLLM2, torch.float32, "100MB")
    models = {"dense": SMOLLM2, "sparsegpt 50%": compressed(args.workdir)}
    rows = {(name, backend): in_fresh_process(backend, model, args.batch)
            for name, model in models.items() for backend in ("streamed", "hf")}
    print(f"SmolLM2-135M on {TASK} ({rows[('dense', 'hf')]['requests']} requests, batch {args.batch}, one thread)")
    print("| model | backend | acc | acc_norm | peak RSS (MiB) | RSS after imports (MiB) | s / 1000 requests |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (name, backend), row in rows.items():
        print(f"| {name} | {'streamed (eval --tasks)' if backend == 'streamed' else 'lm-eval HF backend'} | "
              f"{row['acc']:.4f} | {row['acc_norm']:.4f} | {row['peak_rss_mib']:.0f} | "
              f"{row['rss_after_imports_mib']:.0f} | {row['seconds_per_1000_requests']:.1f} |")
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "results.json").write_text(json.dumps({f"{n} / {b}": r for (n, b), r in rows.items()}, indent=2))
    print(f"reproduce: python tools/bench_harness.py --workdir {args.workdir} --batch {args.batch}")


if __name__ == "__main__":
    main()
