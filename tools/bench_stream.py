"""Benchmarks of the streaming spine and of resume (not timed tests: figures for the closing notes).

    python tools/bench_stream.py quality  [--out runs/bench]   # SmolLM2 perplexity: dense, magnitude, wanda, sparsegpt
    python tools/bench_stream.py memory   [--out runs/bench]   # peak RSS of compress (wanda) at depth 4 vs 16, same width
    python tools/bench_stream.py offload  [--out runs/bench]   # peak RSS and time with/without --offload-activations
    python tools/bench_stream.py resume   [--out runs/bench]   # seconds from restart to the next block

Every run is a separate `python main.py ...` process, measured from outside: its own peak RSS (VmHWM at exit), wall
time, bytes read and written from the run's journal, per-block phase times from its log.
Results go to OUT/<benchmark>.json and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOLLM2 = ROOT / "checkpoints" / "smollm2-135m"
PROTOCOL_CALIBRATION = ["--nsamples", "32", "--seqlen", "512", "--seed", "0"]
PROTOCOL_EVALUATION = ["--seqlen", "512", "--windows", "32"]


# Runs SCRIPT as __main__ and, at exit, prints the peak RSS of this process image (VmHWM). wait4's ru_maxrss is not
# that: Linux carries the forking parent's RSS into it (the child's memory before exec counts), so a child of a
# 0.7 GiB pytest process "peaked" at 0.7 GiB whatever it did.
PEAK_LINE = "layerpress-bench peak RSS KiB: "
LAUNCHER = (
    "import atexit, re, runpy, sys\n"
    "def peak():\n"
    "    status = open('/proc/self/status').read()\n"
    f"    print('{PEAK_LINE}' + re.search(r'VmHWM:\\s+(\\d+)', status).group(1), file=sys.stderr, flush=True)\n"
    "atexit.register(peak)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def run_measured(
    argv: list[str], niceness: int = 0, min_available: int | None = None, script: str = "main.py",
    cgroup: Path | None = None, threads: int | None = None,
) -> dict:
    """Run `python SCRIPT ARGV`: wall seconds, peak RSS of exactly that child (its own VmHWM at exit, see LAUNCHER),
    output.

    niceness: run it at that lower priority; min_available: kill it if the machine's available memory drops
    below this many bytes (the machine is shared), and fail saying so; cgroup: start it inside this (v1) cgroup;
    threads: the child's OMP_NUM_THREADS (torch's intra-op threads).
    """
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, script, *argv], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, preexec_fn=lambda: _enter(niceness, cgroup),
        env=None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    starved, finished = threading.Event(), threading.Event()

    def watch() -> None:  # never reaps the child: os.wait4 below gets its exit status
        while not finished.wait(0.5):
            if psutil.virtual_memory().available < min_available:
                starved.set()
                os.kill(process.pid, 9)
                return

    if min_available is not None:
        threading.Thread(target=watch, daemon=True).start()
    output = process.stdout.read()
    _, status, _ = os.wait4(process.pid, 0)
    finished.set()
    if starved.is_set():
        sys.exit(f"aborted: available memory fell under {min_available / 2**30:.1f} GiB: {script} {' '.join(argv)}")
    if status:
        sys.exit(f"failed: {script} {' '.join(argv)}\n{output[-3000:]}")
    peaks = re.findall(re.escape(PEAK_LINE) + r"(\d+)", output)
    if not peaks:
        sys.exit(f"no peak RSS line from {script} {' '.join(argv)}")
    return {"seconds": time.perf_counter() - started, "peak_rss_mib": int(peaks[-1]) / 1024, "output": output}


def _enter(niceness: int, cgroup: Path | None) -> None:
    """In the child before it runs: lower its priority, move it into the cgroup."""
    if niceness:
        os.nice(niceness)
    if cgroup is not None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))


def predicted_peak(output: str) -> int:
    """The host peak, in bytes, that a compress run's own plan predicted (the plan line of its log)."""
    match = re.search(r"plan of \w+: .*predicted host peak ([0-9.]+) (GiB|MiB)", output)
    if not match:
        sys.exit("the compress log has no plan line")
    return int(float(match.group(1)) * (2**30 if match.group(2) == "GiB" else 2**20))


def journal(out: Path) -> dict:
    from streamer.journal import read_journal

    return read_journal(out)


def phase_shares(body: dict) -> dict:
    """Mean seconds per block of each phase, and its share of the block's wall time."""
    timings = body["timings"]
    phases = sorted({k for t in timings for k in t if k != "block"})
    mean = {p: sum(t.get(p, 0.0) for t in timings) / len(timings) for p in phases}
    total = sum(mean.values())
    return {"seconds_per_block": total, "phases": {p: {"seconds": mean[p], "share": mean[p] / total} for p in phases}}


def eval_ppl(model: Path) -> float:
    result = run_measured(["-q", "eval", "--model", str(model), "--device", "cpu", *PROTOCOL_EVALUATION])
    # the last line of its own: the launcher's peak line (stderr, merged into the output) comes after it
    lines = [line for line in result["output"].strip().splitlines() if not line.startswith(PEAK_LINE)]
    return json.loads(lines[-1])["ppl"]


def ensure_smollm2() -> None:
    from tools.convert_gguf import bundled_smollm2, convert
    import torch

    convert(bundled_smollm2(), SMOLLM2, torch.float32, "100MB")


def bench_quality(out: Path) -> dict:
    ensure_smollm2()
    results = {"dense": {"ppl": eval_ppl(SMOLLM2)}}
    for target in (["--sparsity", "0.5"], ["--pattern", "2:4"]):
        for method in ("magnitude", "wanda", "sparsegpt"):
            name = f"{method} {target[1]}"
            directory = out / f"smollm2-{method}-{target[1].replace(':', 'of')}"
            run = run_measured(["-q", "compress", "--model", str(SMOLLM2), "--out", str(directory), "--method", method,
                                *target, "--device", "cpu", *PROTOCOL_CALIBRATION])
            body = journal(directory)
            results[name] = {
                "ppl": eval_ppl(directory),
                "compress_seconds": run["seconds"],
                "peak_rss_mib": run["peak_rss_mib"],
                "bytes_read": body["summary"]["bytes_read"],
                "bytes_written": body["summary"]["bytes_written"],
                **phase_shares(body),
            }
            print(f"{name:16s} ppl {results[name]['ppl']:8.2f}  {run['seconds']:6.1f}s", flush=True)
    return results


def random_llama(directory: Path, depth: int, hidden: int = 1024) -> int:
    """A random-weight Llama-shaped checkpoint (SmolLM2's tokenizer) of `depth` blocks; returns its size in bytes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not (directory / "model.safetensors.index.json").is_file():
        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 2.75),
            num_hidden_layers=depth, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
            max_position_embeddings=2048, tie_word_embeddings=True,
        )
        LlamaForCausalLM(config).save_pretrained(directory, max_shard_size="200MB")
        tokenizer.save_pretrained(directory)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def bench_memory(out: Path) -> dict:
    ensure_smollm2()
    results = {}
    for depth in (4, 16):
        model = out / f"random-llama-1024-d{depth}"
        size = random_llama(model, depth)
        target = out / f"random-llama-1024-d{depth}-wanda"
        run = run_measured(["-q", "compress", "--model", str(model), "--out", str(target), "--method", "wanda",
                            "--sparsity", "0.5", "--nsamples", "16", "--seqlen", "512", "--device", "cpu", "--restart"])
        body = journal(target)
        results[f"depth {depth}"] = {
            "checkpoint_mib": size / 2**20,
            "peak_rss_mib": run["peak_rss_mib"],
            "seconds": run["seconds"],
            **phase_shares(body),
        }
        print(f"depth {depth:2d}: checkpoint {size / 2**20:7.0f} MiB, peak RSS {run['peak_rss_mib']:7.0f} MiB, "
              f"{run['seconds']:.0f}s", flush=True)
    results["deep_over_shallow_rss"] = results["depth 16"]["peak_rss_mib"] / results["depth 4"]["peak_rss_mib"]
    return results


def bench_offload(out: Path, nsamples: int, seqlen: int) -> dict:
    ensure_smollm2()
    results = {}
    calibration = ["--nsamples", str(nsamples), "--seqlen", str(seqlen)]
    for mode, extra in (("ram", []), ("offload", ["--offload-activations", str(out / "offload-acts")])):
        target = out / f"smollm2-magnitude-{mode}"
        run = run_measured(["-q", "compress", "--model", str(SMOLLM2), "--out", str(target), "--method", "magnitude",
                            "--device", "cpu", "--restart", *calibration, *extra])
        results[mode] = {"peak_rss_mib": run["peak_rss_mib"], "seconds": run["seconds"], **phase_shares(journal(target))}
        print(f"{mode:8s}: peak RSS {run['peak_rss_mib']:7.0f} MiB, {run['seconds']:.0f}s", flush=True)
    results["activation_buffer_mib"] = nsamples * seqlen * 576 * 4 / 2**20
    results["calibration"] = f"{nsamples} x {seqlen}"
    return results


def bench_resume(out: Path) -> dict:
    """Kill a run right after block 10's journal record, restart it: seconds until the next block starts."""
    ensure_smollm2()
    target = out / "smollm2-resume"
    argv = ["compress", "--model", str(SMOLLM2), "--out", str(target), "--method", "sparsegpt", "--device", "cpu",
            *PROTOCOL_CALIBRATION]
    results = {}
    for label in ("fresh start", "resume"):
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "main.py", *argv, *(["--restart"] if label == "fresh start" else [])],
                                   cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        for line in process.stderr:
            if "starting at block" in line:
                results[label] = {"seconds_until_next_block": time.perf_counter() - started, "log": line.strip()}
                break
        process.kill()
        process.wait()
        if label == "fresh start":  # leave a killed run behind for the resume measurement
            subprocess.run([sys.executable, "main.py", "-q", *argv, "--restart"], cwd=ROOT, capture_output=True,
                           env={**os.environ, "LAYERPRESS_FAILPOINT": "after-journal:10"})
        print(f"{label:12s}: {results[label]['seconds_until_next_block']:.1f}s until the block loop starts")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=("quality", "memory", "offload", "resume"))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--nsamples", type=int, default=128, help="offload: calibration windows (default: 128)")
    parser.add_argument("--seqlen", type=int, default=2048, help="offload: tokens per window (default: 2048)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.benchmark == "quality":
        results = bench_quality(args.out)
    elif args.benchmark == "memory":
        results = bench_memory(args.out)
    elif args.benchmark == "offload":
        results = bench_offload(args.out, args.nsamples, args.seqlen)
    else:
        results = bench_resume(args.out)
    results["command"] = " ".join(sys.argv)
    (args.out / f"{args.benchmark}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
