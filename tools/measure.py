"""Wall time, CPU time and peak resident memory of one `main.py` command, for benchmark figures.

Runs the command in a child process (so the figures are its own, not this script's) and prints them as one JSON
line after the command's own output:

    python tools/measure.py gradients --model IN --out GRAD --nsamples 32 --seqlen 512
    {"command": "gradients", "exit": 0, "wall_s": ..., "cpu_s": ..., "peak_rss_mib": ...}

CPU time (user + system) is the figure to compare on a shared machine: wall time grows with the load of others.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MAIN = Path(__file__).resolve().parent.parent / "main.py"


def measure(argv: list[str]) -> dict[str, float | int | str]:
    started = time.perf_counter()
    code = subprocess.call([sys.executable, str(MAIN), *argv])
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # ru_maxrss: KiB on Linux
    return {
        "command": next((arg for arg in argv if not arg.startswith("-")), ""),
        "exit": code,
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
    }


if __name__ == "__main__":
    result = measure(sys.argv[1:])
    print(json.dumps(result), flush=True)
    sys.exit(result["exit"])
