"""The calibration activations between two blocks: two buffers (inputs, outputs), walked in micro-batches.

A buffer lives on the compute device when it fits there (no host-device copies between blocks), in host RAM, or in
a memory-mapped file (--offload-activations) so that host RAM holds only the slices being read or written while
the page cache holds the rest. Saving and loading go through the host CHUNK bytes at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .failpoints import failpoint
from .files import guard_disk

CHUNK = 64 * 2**20  # bytes per host staging copy when saving or loading a buffer


def micro_batches(windows: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` windows covering all `windows`."""
    return [slice(start, min(start + size, windows)) for start in range(0, windows, size)]


class ActivationBuffer:
    """A (windows, seqlen, hidden) tensor on a device, in RAM, or backed by a file."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        dtype: torch.dtype,
        path: Path | None = None,
        device: torch.device | None = None,
    ):
        self.shape, self.dtype, self.path = shape, dtype, path
        self._map: np.memmap | None = None
        if path is None:
            self.data = torch.empty(shape, dtype=dtype, device=device or torch.device("cpu"))
            return
        nbytes = shape[0] * shape[1] * shape[2] * dtype.itemsize
        path.parent.mkdir(parents=True, exist_ok=True)
        reuse = path.is_file() and path.stat().st_size == nbytes  # a resumed run may find its inputs here
        with guard_disk(path):
            self._map = np.memmap(path, dtype=np.uint8, mode="r+" if reuse else "w+", shape=(nbytes,))
        self.data = torch.from_numpy(self._map).view(dtype).view(shape)

    def flush(self) -> None:
        """Make a file-backed buffer's contents durable."""
        if self._map is not None:
            with guard_disk(self.path):
                self._map.flush()

    def _bytes(self) -> torch.Tensor:
        return self.data.reshape(-1).view(torch.uint8)

    def save(self, path: Path) -> None:
        """Persist the contents to `path` (temporary name, fsync, rename)."""
        temporary = path.with_name(path.name + ".tmp")
        raw = self._bytes()
        half = len(raw) // 2
        with guard_disk(path):
            with open(temporary, "wb") as handle:
                for begin, end in ((0, half), (half, len(raw))):
                    for start in range(begin, end, CHUNK):  # a view on the host; a staged copy from a device
                        handle.write(memoryview(raw[start : min(start + CHUNK, end)].cpu().numpy()))
                    if begin == 0:
                        failpoint("inputs-save")  # dies with the next block's inputs half saved
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)

    def load(self, path: Path) -> None:
        """Fill the buffer from a file written by `save` (or another buffer's backing file)."""
        if self.path is not None and path.resolve() == self.path.resolve():
            return
        raw = self._bytes()
        on_host = raw.device.type == "cpu"
        staging = None if on_host else torch.empty(min(CHUNK, len(raw)), dtype=torch.uint8)
        with open(path, "rb") as handle:
            for start in range(0, len(raw), CHUNK):
                end = min(start + CHUNK, len(raw))
                chunk = raw[start:end] if on_host else staging[: end - start]
                view, done = memoryview(chunk.numpy()), 0
                while done < len(view):
                    count = handle.readinto(view[done:])
                    if not count:
                        raise OSError(f"{path} is shorter than the activations it should hold")
                    done += count
                if not on_host:
                    raw[start:end].copy_(chunk)


class Activations:
    """Inputs and outputs of the block being processed, for all calibration (or evaluation) windows."""

    def __init__(
        self,
        windows: int,
        seqlen: int,
        hidden: int,
        dtype: torch.dtype,
        micro_batch: int = 1,
        offload_dir: Path | None = None,
        device: torch.device | None = None,
        lengths: list[int] | None = None,
    ):
        """device: keep both buffers there (when they fit beside the block); None: host RAM or `offload_dir`.
        lengths: the tokens each window really holds, longest first (right-padded requests of different lengths:
        a micro-batch runs on its longest window's tokens only); None: every window holds `seqlen`."""
        shape = (windows, seqlen, hidden)
        paths = [None, None] if offload_dir is None else [offload_dir / f"activations-{i}.bin" for i in (0, 1)]
        self.inputs = ActivationBuffer(shape, dtype, paths[0], device)
        self.outputs = ActivationBuffer(shape, dtype, paths[1], device)
        self.micro_batch = max(1, micro_batch)
        self.windows, self.seqlen, self.lengths = windows, seqlen, lengths

    def batches(self) -> list[slice]:
        return micro_batches(self.windows, self.micro_batch)

    def length(self, batch: slice) -> int:
        """Tokens a micro-batch runs on: its longest window's (the columns past it are padding nobody reads)."""
        return self.seqlen if self.lengths is None else max(self.lengths[batch])

    def batch_shapes(self) -> set[tuple[int, int]]:
        """The (windows, tokens) shapes of the micro-batches, each needing its own block extras (masks)."""
        return {(batch.stop - batch.start, self.length(batch)) for batch in self.batches()}

    def run(
        self,
        step: Callable[[torch.Tensor], torch.Tensor | None],
        device: torch.device,
        keep_outputs: bool = True,
    ) -> None:
        """Apply `step` to every micro-batch of the inputs (on `device`); store its results as the outputs.

        Buffers on `device` are used in place: no copy leaves the device."""
        with torch.no_grad():
            for batch in self.batches():
                tokens = slice(0, self.length(batch))
                result = step(self.inputs.data[batch, tokens].to(device))
                if keep_outputs:
                    self.outputs.data[batch, tokens] = result.to(self.outputs.dtype)

    def swap(self) -> None:
        """The outputs of this block become the inputs of the next."""
        self.inputs, self.outputs = self.outputs, self.inputs
