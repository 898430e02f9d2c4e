"""What only a GPU would show, caught on a CPU: running out of device memory ends in one line and a resumable run,
phase clocks wait for the device, the allocator is configured before CUDA starts, device peaks are journaled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import main
from methods import METHODS
from streamer import stream
from streamer.stream import Phases, StreamOptions
from tests.test_compress import NSAMPLES, SEQLEN
from tests.test_resume import output_digest

ROOT = Path(__file__).resolve().parent.parent


def compress_argv(model, out, calib) -> list[str]:
    return ["compress", "--model", str(model), "--out", str(out), "--calib", str(calib), "--nsamples", str(NSAMPLES),
            "--seqlen", str(SEQLEN), "--device", "cpu", "--method", "sparsegpt"]


def test_out_of_device_memory_names_the_place_and_what_to_lower_and_the_run_resumes(
    tiny_checkpoints, tmp_path, calib_text, monkeypatch, capsys
):
    model = tiny_checkpoints["llama"]
    assert main.main(compress_argv(model, tmp_path / "clean", calib_text)) == 0
    sparsegpt, calls = METHODS["sparsegpt"], []
    real = sparsegpt.compress

    def out_of_memory_in_block_two(self, layer, statistic, target):
        calls.append(layer)
        if len(calls) == 8:  # 7 linear layers per Llama block: the first layer of block 2
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, layer, statistic, target)

    monkeypatch.setattr(sparsegpt, "compress", out_of_memory_in_block_two)
    capsys.readouterr()
    assert main.main(compress_argv(model, tmp_path / "resumed", calib_text)) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("layerpress: error: compress: out of cpu memory in block 2, "
                                                  "phase compress (model.layers.1.self_attn.q_proj): lower "
                                                  "--micro-batch"), error
    assert "--statistics-per-layer" in error and "--offload-activations" in error and "resume" in error
    monkeypatch.undo()
    assert main.main(compress_argv(model, tmp_path / "resumed", calib_text)) == 0
    assert output_digest(tmp_path / "resumed") == output_digest(tmp_path / "clean")


def test_out_of_device_memory_outside_a_layer_names_the_phase(tiny_checkpoints, tmp_path, calib_text, monkeypatch,
                                                              capsys):
    def no_memory_for_the_forward(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(stream.BlockContext, "forward", no_memory_for_the_forward)
    argv = ["eval", "--model", str(tiny_checkpoints["opt"]), "--data", str(calib_text), "--seqlen", "16",
            "--windows", "2", "--device", "cpu"]
    assert main.main(argv) == 1
    assert "eval: out of cpu memory in block 1, phase propagate: lower --micro-batch" in capsys.readouterr().err


def test_phase_clocks_wait_for_the_device_on_cuda(monkeypatch):
    synchronized = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronized.append(device))
    with tqdm(disable=True) as bar:
        phase = Phases(0, bar, torch.device("cuda", 0))
        with phase("observe"):
            assert len(synchronized) == 1  # the work queued before the phase is not counted in it
        assert synchronized == [torch.device("cuda", 0)] * 2  # the phase's own kernels are
        on_cpu = Phases(0, bar)
        with on_cpu("observe"):
            pass
    assert len(synchronized) == 2


def test_device_peaks_are_journaled_beside_the_plan_on_cuda_only(monkeypatch):
    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    options = StreamOptions(device=torch.device("cuda"), planned_device_peak=4 * 2**30)
    assert stream._device_peak(options, 5) == {"device_peaks": {"5": {"measured": 3 * 2**30, "planned": 4 * 2**30}}}
    assert len(resets) == 1  # the next block is measured from zero
    assert stream._device_peak(StreamOptions(), 5) == {}


def test_the_cuda_allocator_is_configured_before_torch_starts_unless_the_user_did(tmp_path):
    code = "import main, os, json; print(json.dumps(os.environ.get('PYTORCH_CUDA_ALLOC_CONF')))"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    ours = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True)
    assert json.loads(ours.stdout) == "expandable_segments:True"
    theirs = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**clean, "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"})
    assert json.loads(theirs.stdout) == "max_split_size_mb:512"


def test_the_prepared_gpu_check_runs_its_cpu_self_test(tmp_path):
    """tools/gpu_check.sh is what a lent GPU runs: its cross-device part must work before a GPU is ever seen."""
    shown = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--device", "cpu", "--tiny-only", "--out",
                            str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHON": sys.executable})
    assert shown.returncode == 0, shown.stdout[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["family"] for row in summary["tiny"]] == ["opt", "bloom", "llama"]
    assert all(row["max_weight_difference"] == 0 and row["mask_agreement"] == 1 for row in summary["tiny"])
    assert "| llama | 0 | 100.000% |" in shown.stdout
    assert [row["size"] for row in summary["factor"]] == [1024, 2048]  # both factor paths, timed and compared
    assert all(row["relative_difference"] < 1e-4 for row in summary["factor"])
