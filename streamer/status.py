"""`main.py status OUT`: how far a run got, with what settings, and what is left."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LayerpressError
from .journal import read_journal


def describe(out: Path) -> str:
    body = read_journal(out)
    if body is None:
        raise LayerpressError(f"{out} holds no layerpress run (no .layerpress/journal.json)")
    done, total = body["blocks_done"], body["total_blocks"]
    timings = body.get("timings", [])
    lines = [f"{out}: {body['command']} {body['state']}, {done} of {total} blocks done"]
    if body["command"] == "gradients":  # walks the blocks twice: forward, then backward
        backward = body.get("backward", {}).get("blocks_done", 0)
        lines[0] = f"{out}: gradients {body['state']}, forward {done} of {total} blocks, backward {backward} of {total}"
        done, total = done + backward, 2 * total
    if timings:
        per_block = sum(sum(v for k, v in t.items() if k != "block") for t in timings) / len(timings)
        lines.append(f"  mean time per block: {per_block:.1f}s")
        if body["state"] != "complete":
            lines.append(f"  left: {total - done} blocks, about {per_block * (total - done) / 60:.1f} min")
    if "writer" in body:
        lines.append(f"  shards finished: {len(body['writer']['checksums'])}")
    if body.get("summary"):
        written = body["summary"].get("bytes_written")
        lines.append(f"  total: {body['summary']['seconds']:.1f}s" + (f", {written} bytes written" if written else ""))
    lines.append("  settings: " + json.dumps(body["settings"], sort_keys=True))
    lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in body["versions"].items()))
    return "\n".join(lines)
