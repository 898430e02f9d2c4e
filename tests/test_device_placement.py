"""What only a GPU would show, caught on the CPU: every tensor a block's phases make is made on the block's device.

A torch function mode is active during every block phase but I/O (read, encode, persist, write wait) and records each
factory call (torch.zeros, arange, rand, ...) that names no device: on a GPU such a tensor lands on the host, and
either costs a copy per layer or fails beside the device's tensors. A tensor meant for the host says so
(device="cpu": the reconstruction's host generator draws there). Host reads per layer are counted separately
(tests/test_sync_count.py).
"""

from __future__ import annotations

import inspect
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

import main
from streamer.stream import Phases

ROOT = Path(__file__).resolve().parent.parent
FACTORIES = {"empty", "zeros", "ones", "full", "arange", "rand", "randn", "randint", "randperm", "normal",
             "empty_strided", "eye", "linspace", "tensor", "as_tensor"}
IO_PHASES = {"read", "encode", "persist", "write wait"}
RUNS = {
    "sparsegpt 4-bit g32, reconstruct biases,norms": ["--method", "sparsegpt", "--wbits", "4", "--groupsize", "32",
                                                      "--reconstruct", "biases,norms", "--recon-steps", "2"],
    "wanda, reconstruct masklora": ["--method", "wanda", "--reconstruct", "masklora", "--recon-steps", "2"],
    "gptq act-order packed": ["--method", "gptq", "--wbits", "4", "--groupsize", "32", "--act-order", "group",
                              "--format", "packed"],
    "wanda 2:4 sparse": ["--method", "wanda", "--pattern", "2:4", "--format", "sparse"],
    "rtn": ["--method", "rtn", "--wbits", "3", "--asym"],
    "flap": ["--method", "flap", "--ratio", "0.2"],
}


class ImplicitDevices(TorchFunctionMode):
    """Records (function, file:line of our code) of every factory call made without a device."""

    def __init__(self, found: list[str]):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in FACTORIES and kwargs.get("device") is None:
            ours = [frame for frame in traceback.extract_stack()[:-1] if frame.filename.startswith(str(ROOT))
                    and "/.venv/" not in frame.filename]
            where = f"{Path(ours[-1].filename).relative_to(ROOT)}:{ours[-1].lineno}" if ours else "torch itself"
            self.found.append(f"{func.__name__} at {where}")
        return func(*args, **kwargs)


@pytest.fixture
def implicit_devices(monkeypatch) -> list[str]:
    found: list[str] = []
    timed = Phases.__call__

    @contextmanager
    def watched(self: Phases, name: str):
        with timed(self, name):
            if name in IO_PHASES:
                yield
            else:
                with ImplicitDevices(found):
                    yield

    monkeypatch.setattr(Phases, "__call__", watched)
    return found


def common(model: Path, calib: Path) -> list[str]:
    return ["--model", str(model), "--calib", str(calib), "--nsamples", "2", "--seqlen", "32", "--device", "cpu"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_compress_phases_make_every_tensor_on_the_blocks_device(tiny_checkpoints, tmp_path, calib_text,
                                                                implicit_devices, name):
    argv = ["-q", "compress", *common(tiny_checkpoints["llama"], calib_text), "--out", str(tmp_path / "out"),
            *RUNS[name]]
    assert main.main(argv) == 0
    assert implicit_devices == []


def test_score_phases_make_every_tensor_on_the_blocks_device(tiny_checkpoints, tmp_path, calib_text,
                                                             implicit_devices):
    argv = ["-q", "scores", *common(tiny_checkpoints["opt"], calib_text), "--out", str(tmp_path / "scores"),
            "--inputs", "pruned"]
    assert main.main(argv) == 0
    assert implicit_devices == []


def test_the_check_reports_a_tensor_made_on_the_host_and_where(implicit_devices):
    with Phases(0, tqdm(disable=True))("compress"):
        torch.zeros(3, device="cpu")  # meant for the host: not reported
        line = inspect.currentframe().f_lineno + 1
        torch.zeros(3)
    with Phases(0, tqdm(disable=True))("read"):  # I/O phases make host tensors by design
        torch.zeros(3)
    assert implicit_devices == [f"zeros at tests/{Path(__file__).name}:{line}"]
