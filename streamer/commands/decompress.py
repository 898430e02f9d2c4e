"""`decompress`: write the dense checkpoint a packed or sparse output stands for.

The output is the dense view of streamer/decoded.py written out tensor by tensor in the stored order, with the
compress run's shard size, so its shards are byte for byte those of `--format dense`. Resumable per tensor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from ..decoded import DecodedCheckpoint, open_checkpoint
from ..errors import LayerpressError
from ..journal import Run
from ..output import finish_output, resumed_writer
from ..writer import TensorSpec
from .lifecycle import RunRequest

log = logging.getLogger("layerpress")

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def decompress(model: Path, out: Path, max_shard_bytes: int | None = None, restart: bool = False) -> Path:
    """Write the dense checkpoint a packed or sparse output stands for; resumes a partial run of the same command."""
    request = RunRequest("decompress", out, model, restart)
    view = open_checkpoint(model)
    if not isinstance(view, DecodedCheckpoint):
        raise LayerpressError(f"{model} holds dense weights already; there is nothing to decompress")
    max_bytes = max_shard_bytes or view.record.get("max_shard_bytes", DEFAULT_MAX_SHARD_BYTES)
    names = list(view.entries)
    settings = {"source": str(model.resolve()), "max_shard_bytes": max_bytes}

    def work(run: Run) -> None:
        started = time.perf_counter()
        specs = [TensorSpec(name, entry.dtype, entry.shape) for name, entry in view.entries.items()]
        with resumed_writer(out, specs, max_bytes, run) as writer:
            for index in tqdm(range(run.blocks_done, len(names)), initial=run.blocks_done, total=len(names),
                              desc="decompress", unit="tensor", disable=None):
                writer.write(names[index], view.read([names[index]])[names[index]])
                writer.sync()
                run.record_block(index, None, {"writer": asdict(writer.state)}, {})
            finish_output(out, model, run, writer, view.config, started, view.bytes_read)
        log.info("decompressed the %s output %s", view.format.name, model)

    request.execute(settings, {"checkpoint": view.fingerprint()}, len(names), work)
    return out
