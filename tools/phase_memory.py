"""Peak resident memory of every phase of a run, to check the memory plan phase by phase (Linux only).

    python tools/phase_memory.py compress --model IN --out OUT --method sparsegpt --sparsity 0.5 --no-prefetch

Runs `main.py` with the given arguments in this process. At the start of every block phase the kernel's peak-RSS
counter is reset (`/proc/self/clear_refs`, "5"); at its end the phase's own peak (VmHWM) is printed to stderr:

    phase memory: block 1 compress: peak 16465 MiB

The peak between two phases (or before the first, after the last) is printed too, named by the phase it precedes:

    phase memory: outside phases, before block 1 read (prune): peak 7731 MiB

Compare with the phases of `main.py plan` for the same settings. The reset also resets what wait4 reports as the
process's peak, so do not measure the overall peak of a run made through this tool (tools/bench_*.py measure that).
"""

from __future__ import annotations

import re
import runpy
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamer.stream import Phases  # noqa: E402


def peak_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def with_peaks(timed):
    """Phases.__call__ that also resets the peak-RSS counter before the phase and prints the phase's peak after."""

    @contextmanager
    def phase(self: Phases, name: str) -> Iterator[None]:
        print(f"phase memory: outside phases, before block {self.index + 1} {name} ({self.desc}): peak "
              f"{peak_mib():.0f} MiB", file=sys.stderr, flush=True)
        Path("/proc/self/clear_refs").write_text("5")
        try:
            with timed(self, name):
                yield
        finally:
            print(f"phase memory: block {self.index + 1} {name}: peak {peak_mib():.0f} MiB", file=sys.stderr,
                  flush=True)
            Path("/proc/self/clear_refs").write_text("5")  # what follows, until the next phase, is outside phases

    return phase


def main() -> None:
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("phase_memory needs Linux's /proc/self/clear_refs")
    Phases.__call__ = with_peaks(Phases.__call__)
    sys.argv = [str(ROOT / "main.py"), *sys.argv[1:]]
    try:
        runpy.run_path(str(ROOT / "main.py"), run_name="__main__")
    finally:
        print(f"phase memory: outside phases, after the last: peak {peak_mib():.0f} MiB", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
