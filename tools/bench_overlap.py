"""Reading overlapped with compute: compress with and without prefetch, its checkpoint read cold (and throttled).

    python tools/bench_overlap.py [--model checkpoints/smollm2-135m] [--method wanda] [--read-mbps 10]

Before each run the checkpoint's shards are evicted from the page cache (posix_fadvise DONTNEED, which needs no
root), so every byte of the model comes from the disk. With --read-mbps the run's reads are also throttled to that
rate by a cgroup v1 blkio throttle on the checkpoint's block device (root only): a network disk, in effect, and a
way to make reading a block take as long as compressing it, where overlap matters most. Writes are not throttled.

From each run's journal (per-block phase seconds; `read` is the wait for the block, which prefetch hides):
    block loop  = sum over blocks of all phases
    serial      = the block loop of the run without prefetch (read, compute, write in turn)
    ideal       = sum over blocks of max(read, compute, write) of that run: the most overlap can give
    overlap     = (serial - block loop with prefetch) / (serial - ideal): 0 nothing overlapped, 1 all of it
The serial run's reads are already helped by the kernel's own readahead while it computes, so its read time is a
lower bound of the disk's, and the ratio understates prefetch. Results go to OUT/overlap-<rate>mibps.json (or
overlap-cold.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.bench_stream import SMOLLM2, ensure_smollm2, journal, run_measured  # noqa: E402

BLKIO = Path("/sys/fs/cgroup/blkio")
OUTSIDE_COMPUTE = ("read", "write")


def evict(model: Path) -> None:
    """Drop the checkpoint's shards from the page cache (clean pages only: they were never written by us)."""
    for shard in model.glob("*.safetensors"):
        descriptor = os.open(shard, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def throttle(model: Path, mbps: float) -> Path:
    """A blkio cgroup whose members read the checkpoint's disk at `mbps` MiB/s at most."""
    stat = os.stat(next(model.glob("*.safetensors")))
    device = f"{os.major(stat.st_dev)}:{os.minor(stat.st_dev)}"
    disk = Path(f"/sys/dev/block/{device}")
    if (disk / "partition").is_file():  # throttles apply to whole disks: a partition's parent is one
        device = (disk.resolve().parent / "dev").read_text().strip()
    group = BLKIO / "layerpress-bench"
    try:
        group.mkdir(exist_ok=True)
        (group / "blkio.throttle.read_bps_device").write_text(f"{device} {int(mbps * 2**20)}")
    except OSError as exc:
        sys.exit(f"--read-mbps needs root and a cgroup v1 blkio hierarchy at {BLKIO}: {exc}")
    return group


def loop_figures(body: dict) -> dict:
    """Seconds of the block loop, and of its read, compute and write, summed over blocks."""
    timings = body["timings"]
    read = sum(t.get("read", 0.0) for t in timings)
    write = sum(t.get("write", 0.0) for t in timings)
    loop = sum(v for t in timings for k, v in t.items() if k != "block")
    ideal = sum(max(t.get("read", 0.0), t.get("write", 0.0),
                    sum(v for k, v in t.items() if k not in ("block", *OUTSIDE_COMPUTE))) for t in timings)
    return {"block_loop_seconds": loop, "read_seconds": read, "write_seconds": write,
            "compute_seconds": loop - read - write, "ideal_seconds": ideal}


def bench(model: Path, method: str, nsamples: int, seqlen: int, mbps: float | None, out: Path) -> dict:
    group = throttle(model, mbps) if mbps else None
    results: dict = {"model": str(model), "method": method, "calibration": f"{nsamples} x {seqlen}",
                     "read_limit_mib_per_s": mbps}
    try:
        for label, extra in (("without prefetch", ["--no-prefetch"]), ("with prefetch", [])):
            target = out / f"{model.name}-{method}-{'serial' if extra else 'prefetch'}"
            evict(model)
            run = run_measured(["-q", "compress", "--model", str(model), "--out", str(target), "--method", method,
                                "--sparsity", "0.5", "--nsamples", str(nsamples), "--seqlen", str(seqlen),
                                "--device", "cpu", "--restart", *extra], cgroup=group)
            results[label] = {"wall_seconds": run["seconds"], "peak_rss_mib": run["peak_rss_mib"],
                              **loop_figures(journal(target))}
            figures = results[label]
            print(f"{label:17s} wall {run['seconds']:6.1f} s, block loop {figures['block_loop_seconds']:6.1f} s "
                  f"(read {figures['read_seconds']:.1f}, compute {figures['compute_seconds']:.1f}, "
                  f"write {figures['write_seconds']:.1f})", flush=True)
    finally:
        if group is not None:
            group.rmdir()  # its members have exited
    serial, overlapped = results["without prefetch"], results["with prefetch"]
    gain = serial["block_loop_seconds"] - overlapped["block_loop_seconds"]
    room = serial["block_loop_seconds"] - serial["ideal_seconds"]
    results["overlap_ratio"] = gain / room if room > 0 else None
    results["speedup"] = serial["wall_seconds"] / overlapped["wall_seconds"]
    print(f"ideal block loop {serial['ideal_seconds']:.1f} s; overlap ratio "
          f"{results['overlap_ratio']:.2f}; wall-time speed-up {results['speedup']:.2f}x")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SMOLLM2)
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--read-mbps", type=float, default=None, help="throttle reads to this many MiB/s (root)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "overlap")
    args = parser.parse_args()
    if args.model == SMOLLM2:
        ensure_smollm2()
    args.out.mkdir(parents=True, exist_ok=True)
    results = bench(args.model, args.method, args.nsamples, args.seqlen, args.read_mbps, args.out)
    name = f"overlap-{args.read_mbps:g}mibps.json" if args.read_mbps else "overlap-cold.json"
    (args.out / name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
