"""The streamed backward pass (`main.py gradients`) and GBLM-Pruner on tiny OPT, BLOOM and Llama checkpoints.

The gradients must be those of whole-model autograd; gblm streamed must equal gblm in memory; a killed gradient
pass must resume to the same bytes; gradients of another model or other calibration windows must be refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import main
from methods import METHODS, Target
from methods.gblm import GBLM
from streamer.commands import gradients
from streamer.adapters import adapter_for
from streamer.data import DEFAULT_CALIBRATION, calibration_windows, load_text, load_tokenizer, tokenize
from streamer.model import StagedModel
from tests.conftest import FAMILIES
from tests.reference import compress_in_memory
from tests.test_compress import load_state

NSAMPLES, SEQLEN, MICRO_BATCH = 4, 32, "3"  # micro-batches of 3 and 1 windows: extras of two sizes
HEAD_POSITIONS = 10  # the head's chunks of a window's 31 predicting positions: 10, 10, 10, 1


def calibration_args(calib, nsamples: int = NSAMPLES) -> list[str]:
    return ["--calib", str(calib), "--nsamples", str(nsamples), "--seqlen", str(SEQLEN), "--device", "cpu"]


def run_gradients(model, out, calib, *extra: str) -> int:
    return main.main(["gradients", "--model", str(model), "--out", str(out), *calibration_args(calib), *extra])


def run_gblm(model, out, calib, gradients, *extra: str, nsamples: int = NSAMPLES) -> int:
    argv = ["compress", "--model", str(model), "--out", str(out), *calibration_args(calib, nsamples),
            "--method", "gblm", "--gradients", str(gradients), *extra]
    return main.main(argv)


def windows_of(model, calib) -> torch.Tensor:
    return calibration_windows(tokenize(load_tokenizer(model), load_text(calib)), NSAMPLES, SEQLEN, 0)


def load_gradients(directory) -> dict[str, torch.Tensor]:
    norms = {}
    for path in sorted(directory.glob("gradients-*.safetensors")):
        norms.update(load_file(path))
    return norms


def whole_model_gradient_norms(model_dir, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The oracle: the whole model in memory, `loss.backward()` once per window, squared weight gradients summed."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    adapter = adapter_for(model.config.to_dict())
    blocks = model.get_submodule(adapter.blocks)
    weights = {
        f"{adapter.blocks}.{index}.{name}.weight": block.get_submodule(name).weight
        for index, block in enumerate(blocks)
        for name in adapter.linear_names
    }
    squares = {name: torch.zeros_like(weight) for name, weight in weights.items()}
    for window in windows:
        model.zero_grad()
        model(window.unsqueeze(0), labels=window.unsqueeze(0)).loss.backward()
        for name, weight in weights.items():
            squares[name] += weight.grad.pow(2)
    return {name: square.sqrt() for name, square in squares.items()}


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "calib.txt"
    path.write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gradient_dirs(tiny_checkpoints, tmp_path_factory, calib) -> dict[str, Path]:
    """One finished gradient pass per family, made once for this module; tests must not modify them.

    The head runs on HEAD_POSITIONS positions at a time, so that a window's positions come in uneven chunks.
    """
    dirs = {family: tmp_path_factory.mktemp(f"gradients-{family}") / "grad" for family in FAMILIES}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gradients, "HEAD_POSITIONS", HEAD_POSITIONS)
        for family, directory in dirs.items():
            assert run_gradients(tiny_checkpoints[family], directory, calib, "--micro-batch", MICRO_BATCH) == 0
    return dirs


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_gradients_equal_whole_model_backward(tiny_checkpoints, gradient_dirs, calib, family):
    expected = whole_model_gradient_norms(tiny_checkpoints[family], windows_of(tiny_checkpoints[family], calib))
    streamed = load_gradients(gradient_dirs[family])
    assert streamed.keys() == expected.keys()
    for name, norms in expected.items():
        assert norms.abs().max() > 0, name
        torch.testing.assert_close(streamed[name], norms, rtol=1e-5, atol=1e-5 * norms.abs().max().item(), msg=name)
    leftovers = {path.name for path in (gradient_dirs[family] / ".layerpress").iterdir()}
    assert leftovers == {"journal.json", "lock"}, "activation and gradient buffers must be removed when done"


def test_status_tells_both_walks(gradient_dirs, capsys):
    assert main.main(["status", str(gradient_dirs["llama"])]) == 0
    assert "gradients complete, forward 3 of 3 blocks, backward 3 of 3" in capsys.readouterr().out


def test_micro_batches_keep_windows_apart(tiny_checkpoints, gradient_dirs, calib, tmp_path):
    """OPT flattens windows with tokens in its MLP: per-window gradients must still be per window."""
    assert run_gradients(tiny_checkpoints["opt"], tmp_path / "grad", calib, "--micro-batch", "1") == 0
    one_by_one, batched = load_gradients(tmp_path / "grad"), load_gradients(gradient_dirs["opt"])
    for name, norms in one_by_one.items():
        torch.testing.assert_close(batched[name], norms, rtol=1e-5, atol=1e-5 * norms.abs().max().item(), msg=name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_gblm_streamed_equals_in_memory(tiny_checkpoints, gradient_dirs, tmp_path, calib, family, pattern):
    model = tiny_checkpoints[family]
    out = tmp_path / "out"
    assert run_gblm(model, out, calib, gradient_dirs[family], *(["--pattern", pattern] if pattern else [])) == 0

    norms = load_gradients(gradient_dirs[family])
    precomputed = {name.removesuffix(".weight"): {"gradient_norms": tensor} for name, tensor in norms.items()}
    target = Target(pattern=(2, 4)) if pattern else Target(sparsity=0.5)
    method = GBLM(alpha=100.0, windows=NSAMPLES)
    expected = compress_in_memory(model, method, target, windows_of(model, calib), precomputed=precomputed)
    streamed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(streamed[name], tensor, rtol=0, atol=1e-6, msg=name)
    record = json.loads((out / "config.json").read_text())["layerpress"]
    assert record["method"] == "gblm" and record["method_settings"] == {"alpha": 100.0, "windows": NSAMPLES}


def test_gblm_sparse_output_decompresses_to_the_dense_output(tiny_checkpoints, gradient_dirs, tmp_path, calib):
    """--format sparse sizes every layer's kept values before any maths, from gblm's exact pruned count."""
    model, norms = tiny_checkpoints["llama"], gradient_dirs["llama"]
    for fmt in ("dense", "sparse"):
        assert run_gblm(model, tmp_path / fmt, calib, norms, "--format", fmt, "--max-shard-size", "60KB") == 0
    assert main.main(["decompress", "--model", str(tmp_path / "sparse"), "--out", str(tmp_path / "decoded")]) == 0
    assert any(name.endswith(".weight_bitmask") for name in load_state(tmp_path / "sparse"))
    dense, decoded = load_state(tmp_path / "dense"), load_state(tmp_path / "decoded")
    assert decoded.keys() == dense.keys()
    for name, tensor in dense.items():
        assert torch.equal(decoded[name], tensor), name


def scored_layer(rows: int = 8, columns: int = 16, windows: int = 3) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(columns, rows, bias=False)
    return layer, torch.randn(windows, 5, columns), torch.rand(rows, columns)


def gblm_result(layer: nn.Linear, inputs: torch.Tensor, gradient_norms: torch.Tensor, alpha: float, target: Target):
    method = GBLM(alpha=alpha, windows=inputs.shape[0])
    statistic = method.statistic(layer, gradient_norms=gradient_norms)
    statistic.update(inputs)
    return method.compress(layer, statistic, target)


def test_gblm_prunes_the_lowest_activation_plus_gradient_scores_in_each_row():
    layer, inputs, gradient_norms = scored_layer()
    result = gblm_result(layer, inputs, gradient_norms, alpha=2.0, target=Target(sparsity=0.25))

    weight = layer.weight.detach().abs()
    activation = inputs.reshape(-1, inputs.shape[-1]).pow(2).sum(0).div(inputs.shape[0]).sqrt()
    scores = weight * activation + 2.0 * weight * gradient_norms
    expected = scores <= scores.kthvalue(4, dim=1, keepdim=True).values  # 25% of 16 columns
    assert torch.equal(result.mask, expected)
    assert torch.equal(result.weight, layer.weight.detach().masked_fill(expected, 0))


def test_gblm_without_gradient_term_is_wanda_and_with_it_is_not():
    layer, inputs, gradient_norms = scored_layer()
    wanda = METHODS["wanda"]()
    statistic = wanda.statistic(layer)
    statistic.update(inputs)
    wanda_mask = wanda.compress(layer, statistic, Target(sparsity=0.5)).mask

    assert torch.equal(gblm_result(layer, inputs, gradient_norms, 0.0, Target(sparsity=0.5)).mask, wanda_mask)
    assert not torch.equal(gblm_result(layer, inputs, gradient_norms, 100.0, Target(sparsity=0.5)).mask, wanda_mask)


@pytest.mark.parametrize("kill_at", [2, 4, 5], ids=["forward", "after-head", "backward"])
def test_killed_gradient_pass_resumes_to_the_same_gradients(
    tiny_checkpoints, gradient_dirs, tmp_path, calib, monkeypatch, kill_at
):
    """3 blocks: block loads 1-3 walk forward, then the head, then loads 4-6 walk backward (blocks 2, 1, 0)."""
    load_block, loads, armed = StagedModel.load_block, [], [True]

    def killed_at_load(self, index, tensors=None):
        loads.append(index)
        if armed[0] and len(loads) == kill_at:
            armed[0] = False
            raise KeyboardInterrupt
        return load_block(self, index, tensors)

    monkeypatch.setattr(StagedModel, "load_block", killed_at_load)
    monkeypatch.setattr(gradients, "HEAD_POSITIONS", HEAD_POSITIONS)  # as the clean run's
    killed = tmp_path / "grad"
    assert run_gradients(tiny_checkpoints["opt"], killed, calib, "--micro-batch", MICRO_BATCH) == 130
    loads.clear()
    assert run_gradients(tiny_checkpoints["opt"], killed, calib, "--micro-batch", MICRO_BATCH) == 0
    assert len(loads) == 7 - kill_at, "the resumed run must redo only the blocks left"

    clean = sorted(path.name for path in gradient_dirs["opt"].glob("gradients-*.safetensors"))
    assert clean == sorted(path.name for path in killed.glob("gradients-*.safetensors"))
    for name in clean:
        assert (killed / name).read_bytes() == (gradient_dirs["opt"] / name).read_bytes(), name


def test_gradients_of_another_model_or_other_windows_are_refused(
    tiny_checkpoints, gradient_dirs, tmp_path, calib, capsys
):
    llama, out = gradient_dirs["llama"], tmp_path / "out"
    assert run_gblm(tiny_checkpoints["opt"], out, calib, llama) == 1
    assert "computed for another model" in capsys.readouterr().err
    assert run_gblm(tiny_checkpoints["llama"], out, calib, llama, nsamples=5) == 1
    assert "calibration nsamples was 4, now 5" in capsys.readouterr().err
    assert main.main(["compress", "--model", str(tiny_checkpoints["llama"]), "--out", str(out),
                      *calibration_args(calib), "--method", "gblm"]) == 1
    assert "needs gradient norms" in capsys.readouterr().err
    assert not out.exists(), "a refused run must write nothing"


def test_damaged_or_unfinished_gradients_are_refused(
    tiny_checkpoints, gradient_dirs, tmp_path, calib, capsys, monkeypatch
):
    copy = tmp_path / "copy"
    shutil.copytree(gradient_dirs["bloom"], copy)
    damaged = copy / "gradients-00001.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-4] + b"\0\0\0\0")
    assert run_gblm(tiny_checkpoints["bloom"], tmp_path / "out", calib, copy) == 1
    assert "gradients-00001.safetensors is missing or damaged" in capsys.readouterr().err

    monkeypatch.setattr(StagedModel, "release_block", lambda self, index: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run_gradients(tiny_checkpoints["bloom"], tmp_path / "unfinished", calib) == 130
    monkeypatch.undo()
    assert run_gblm(tiny_checkpoints["bloom"], tmp_path / "out2", calib, tmp_path / "unfinished") == 1
    assert "is not finished" in capsys.readouterr().err
