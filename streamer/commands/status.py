"""`main.py status OUT`: how far a run got, with what settings, and what is left."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LayerpressError
from ..journal import WORK_DIR, read_journal


def _progress(body: dict, indent: str) -> list[str]:
    done, total = body["blocks_done"], body["total_blocks"]
    timings = body.get("timings", [])
    lines = []
    if timings:
        per_block = sum(sum(v for k, v in t.items() if k != "block") for t in timings) / len(timings)
        lines.append(f"{indent}mean time per block: {per_block:.1f}s")
        if body["state"] != "complete":
            lines.append(f"{indent}left: {total - done} blocks, about {per_block * (total - done) / 60:.1f} min")
    return lines


def describe(out: Path) -> str:
    body = read_journal(out)
    if body is None:
        raise LayerpressError(f"{out} holds no layerpress run (no .layerpress/journal.json)")
    lines = [f"{out}: {body['command']} {body['state']}, {body['blocks_done']} of {body['total_blocks']} blocks done"]
    if body["command"] == "gradients":  # walks the blocks twice: forward, then backward
        backward = body.get("backward", {}).get("blocks_done", 0)
        lines[0] = (f"{out}: gradients {body['state']}, forward {body['blocks_done']} of {body['total_blocks']} "
                    f"blocks, backward {backward} of {body['total_blocks']}")
    lines += _progress(body, "  ")
    for phase in sorted(path for path in (out / WORK_DIR).iterdir() if path.is_dir()):  # passes before the last
        phase_body = read_journal(phase)
        if phase_body is not None:
            lines.append(f"  pass {phase.name}: {phase_body['state']}, "
                         f"{phase_body['blocks_done']} of {phase_body['total_blocks']} blocks done")
            lines += _progress(phase_body, "    ")
    if "writer" in body:  # compress writes shards; a score pass writes scores.json at the end
        lines.append(f"  shards finished: {len(body['writer']['checksums'])}")
    if body.get("summary"):
        summary = body["summary"]
        written = f", {summary['bytes_written']} bytes written" if "bytes_written" in summary else ""
        lines.append(f"  total: {summary['seconds']:.1f}s{written}")
    lines.append("  settings: " + json.dumps(body["settings"], sort_keys=True))
    lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in body["versions"].items()))
    return "\n".join(lines)
