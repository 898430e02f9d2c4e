"""Compressing tiny OPT, BLOOM and Llama checkpoints block by block: the spec of the streaming spine."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import main
from methods import METHODS, Method, Target
from streamer.adapters import adapter_for
from streamer.checkpoint import Checkpoint
from streamer.data import calibration_windows, load_text, load_tokenizer, tokenize
from tests.conftest import FAMILIES
from tests.reference import compress_in_memory, recorded_micro_batch

NSAMPLES, SEQLEN = 4, 32


def run_compress(model, out, calib, *extra: str) -> None:
    argv = ["compress", "--model", str(model), "--out", str(out), "--calib", str(calib),
            "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu", *extra]
    assert main.main(argv) == 0


def load_state(directory) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(directory / shard))
    return state


def assert_streamed_equals_in_memory(model, out, calib, method: Method, target: Target, **options) -> None:
    """The streamed output in `out` equals the in-memory oracle (tests/reference.py), tensor by tensor."""
    windows = calibration_windows(tokenize(load_tokenizer(model), load_text(calib)), NSAMPLES, SEQLEN, 0)
    expected = compress_in_memory(model, method, target, windows, micro_batch=recorded_micro_batch(out), **options)
    streamed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(streamed[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_streamed_equals_in_memory(tiny_checkpoints, tmp_path, calib_text, family, method, pattern):
    model, out = tiny_checkpoints[family], tmp_path / "out"
    run_compress(model, out, calib_text, "--method", method, *(["--pattern", pattern] if pattern else []))
    target = Target(pattern=(2, 4)) if pattern else Target(sparsity=0.5)
    assert_streamed_equals_in_memory(model, out, calib_text, METHODS[method](), target)


@pytest.mark.parametrize("family", FAMILIES)
def test_true_sequential_equals_in_memory(tiny_checkpoints, tmp_path, calib_text, family):
    model, out = tiny_checkpoints[family], tmp_path / "out"
    run_compress(model, out, calib_text, "--method", "sparsegpt", "--true-sequential")
    assert_streamed_equals_in_memory(
        model, out, calib_text, METHODS["sparsegpt"](), Target(sparsity=0.5), true_sequential=True
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_output_is_a_loadable_pruned_checkpoint(tiny_checkpoints, tmp_path, calib_text, family):
    model = tiny_checkpoints[family]
    out = tmp_path / "out"
    run_compress(model, out, calib_text, "--method", "sparsegpt", "--sparsity", "0.6", "--max-shard-size", "30KB")

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(loaded(torch.tensor([[1, 2, 3, 4]])).logits).all()

    adapter = adapter_for(json.loads((model / "config.json").read_text()))
    original, pruned = load_state(model), load_state(out)
    assert original.keys() == pruned.keys()
    compressible = {
        f"{adapter.blocks}.{i}.{name}.weight" for i in range(3) for name in adapter.linear_names
    }
    compressible = {name for name in original if any(name.endswith(c) for c in compressible)}
    assert len(compressible) == 3 * len(adapter.linear_names)
    for name, tensor in original.items():
        assert pruned[name].dtype == tensor.dtype and pruned[name].shape == tensor.shape
        if name in compressible:
            assert abs((pruned[name] == 0).float().mean().item() - 0.6) < 0.02, name
        elif adapter.blocks.split(".")[-1] + "." not in name:
            assert torch.equal(pruned[name], tensor), f"non-block tensor {name} changed"

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for shard in shards:
        tensors = load_file(out / shard)
        data_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert data_bytes <= 30_000 or len(tensors) == 1, f"{shard} exceeds --max-shard-size"
    record = json.loads((out / "config.json").read_text())["layerpress"]
    assert record["method"] == "sparsegpt" and record["sparsity"] == 0.6
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_input_byte_is_read_once(tiny_checkpoints, tmp_path, calib_text, family):
    model = tiny_checkpoints[family]
    run_compress(model, tmp_path / "out", calib_text, "--method", "wanda")
    summary = json.loads((tmp_path / "out" / ".layerpress" / "journal.json").read_text())["body"]["summary"]
    assert summary["bytes_read"] == sum(entry.nbytes for entry in Checkpoint(model).entries.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_n_of_m_holds_in_every_group(tiny_checkpoints, tmp_path, calib_text, family):
    model = tiny_checkpoints[family]
    out = tmp_path / "out"
    run_compress(model, out, calib_text, "--method", "wanda", "--pattern", "2:4")
    adapter = adapter_for(json.loads((model / "config.json").read_text()))
    state = load_state(out)
    checked = 0
    for name, tensor in state.items():
        if any(name.endswith(f"{linear}.weight") for linear in adapter.linear_names):
            zeros = (tensor.reshape(tensor.shape[0], -1, 4) == 0).sum(dim=-1)
            assert (zeros >= 2).all(), name
            checked += 1
    assert checked == 3 * len(adapter.linear_names)


def test_compute_dtype_differs_but_output_keeps_the_checkpoint_dtypes(tiny_checkpoints, tokenizer, tmp_path, calib_text):
    out = tmp_path / "out"
    run_compress(tiny_checkpoints["llama"], out, calib_text, "--method", "sparsegpt", "--dtype", "bfloat16")
    state = load_state(out)
    assert {tensor.dtype for tensor in state.values()} == {torch.float32}
    assert json.loads((out / "config.json").read_text())["layerpress"]["dtype"] == "bfloat16"

    half = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["opt"], dtype=torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16", max_shard_size="40KB")
    tokenizer.save_pretrained(tmp_path / "bf16")
    run_compress(tmp_path / "bf16", tmp_path / "bf16-out", calib_text, "--method", "wanda")
    state = load_state(tmp_path / "bf16-out")
    assert {tensor.dtype for tensor in state.values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16-out").dtype == torch.bfloat16
