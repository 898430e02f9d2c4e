"""Bad input: one clear line on stderr, a non-zero exit, and no output directory that looks complete."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import main

INDEX = "model.safetensors.index.json"


@pytest.fixture
def llama_copy(tiny_checkpoints, tmp_path):
    """A private copy of the tiny Llama checkpoint that a test may damage."""
    return shutil.copytree(tiny_checkpoints["llama"], tmp_path / "model")


def fails_cleanly(capsys, argv: list[str], *expected: str) -> None:
    assert main.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("layerpress: error: ") and "\n" not in error, error
    for text in expected:
        assert text in error, error


def compress(model, out, calib, *extra: str) -> list[str]:
    return ["compress", "--model", str(model), "--out", str(out), "--calib", str(calib), "--nsamples", "2",
            "--seqlen", "16", "--device", "cpu", *extra]


def assert_not_complete(out) -> None:
    assert not (out / INDEX).exists() and not (out / "config.json").exists()


def test_missing_shard(llama_copy, tmp_path, calib_text, capsys):
    shard = sorted(llama_copy.glob("model-*.safetensors"))[2]
    shard.unlink()
    fails_cleanly(capsys, compress(llama_copy, tmp_path / "out", calib_text), "missing checkpoint shard", shard.name)
    assert_not_complete(tmp_path / "out")


@pytest.mark.parametrize("damage", ["garbage header", "truncated data", "huge header length"])
def test_corrupt_shard(llama_copy, tmp_path, calib_text, capsys, damage):
    shard = sorted(llama_copy.glob("model-*.safetensors"))[1]
    raw = shard.read_bytes()
    if damage == "garbage header":
        raw = raw[:8] + b"{not json" + raw[17:]
    elif damage == "truncated data":
        raw = raw[:-100]
    else:
        raw = (10**12).to_bytes(8, "little") + raw[8:]
    shard.write_bytes(raw)
    fails_cleanly(capsys, compress(llama_copy, tmp_path / "out", calib_text), "corrupt safetensors", shard.name)
    assert_not_complete(tmp_path / "out")


def test_unknown_architecture(llama_copy, tmp_path, calib_text, capsys):
    config = json.loads((llama_copy / "config.json").read_text())
    config["model_type"], config["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (llama_copy / "config.json").write_text(json.dumps(config))
    fails_cleanly(capsys, compress(llama_copy, tmp_path / "out", calib_text),
                  "unsupported architecture", "gpt2", "llama", "opt", "bloom")
    fails_cleanly(capsys, ["eval", "--model", str(llama_copy), "--windows", "1", "--seqlen", "16", "--device", "cpu"],
                  "gpt2")


@pytest.mark.parametrize("option", [["--sparsity", "1.0"], ["--sparsity", "-0.1"], ["--pattern", "4:2"],
                                    ["--pattern", "0:4"], ["--nsamples", "0"]])
def test_impossible_settings(tiny_checkpoints, tmp_path, calib_text, capsys, option):
    fails_cleanly(capsys, compress(tiny_checkpoints["opt"], tmp_path / "out", calib_text, *option))
    assert not (tmp_path / "out").exists()


def test_pattern_that_does_not_divide_the_layer(tiny_checkpoints, tmp_path, calib_text, capsys):
    fails_cleanly(capsys, compress(tiny_checkpoints["opt"], tmp_path / "out", calib_text, "--pattern", "2:3", "--method", "wanda"),
                  "2:3 sparsity needs a multiple of 3")
    assert_not_complete(tmp_path / "out")


def test_output_directory_that_is_a_file(tiny_checkpoints, tmp_path, calib_text, capsys):
    out = tmp_path / "out"
    out.write_text("precious")
    fails_cleanly(capsys, compress(tiny_checkpoints["opt"], out, calib_text), "is a file")
    assert out.read_text() == "precious"


def test_output_directory_with_foreign_files(tiny_checkpoints, tmp_path, calib_text, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    fails_cleanly(capsys, compress(tiny_checkpoints["opt"], out, calib_text, "--restart"), "not empty")
    assert (out / "notes.txt").read_text() == "precious"


def test_missing_model_and_calibration(tiny_checkpoints, tmp_path, capsys):
    fails_cleanly(capsys, compress(tmp_path / "nowhere", tmp_path / "out", tmp_path / "calib.txt"), "does not exist")
    fails_cleanly(capsys, compress(tiny_checkpoints["opt"], tmp_path / "out", "no_such_dataset_xyz"),
                  "cannot load text")


def test_nothing_already_written_is_lost_when_the_output_is_complete(tiny_checkpoints, tmp_path, calib_text, capsys):
    out = tmp_path / "out"
    assert main.main(compress(tiny_checkpoints["opt"], out, calib_text)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    fails_cleanly(capsys, compress(tiny_checkpoints["opt"], out, calib_text, "--sparsity", "0.7"), "--restart")
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main.main(compress(tiny_checkpoints["opt"], out, calib_text)) == 0  # same settings: already complete


@pytest.mark.parametrize("command", ["compress", "scores", "gradients", "decompress"])
def test_no_command_writes_into_the_model_it_reads(llama_copy, capsys, command):
    before = {p.name: p.read_bytes() for p in llama_copy.iterdir()}
    fails_cleanly(capsys, [command, "--model", str(llama_copy), "--out", str(llama_copy)],
                  "the output directory must differ from the model directory")
    assert before == {p.name: p.read_bytes() for p in llama_copy.iterdir()}


def test_the_layerpress_command_is_main_py(tmp_path):
    """`pip install` puts a `layerpress` script beside the interpreter; it takes main.py's command line."""
    script = Path(sys.executable).with_name("layerpress")
    shown = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "compress" in shown.stdout and "decompress" in shown.stdout
    refused = subprocess.run([script, "status", str(tmp_path)], capture_output=True, text=True)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"layerpress: error: {tmp_path} holds no layerpress run (no .layerpress/journal.json)"
