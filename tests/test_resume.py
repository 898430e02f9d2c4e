"""Overnight runs that survive anything: kill at any point, rerun the same command, get the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest

import main
from streamer import failpoints
from streamer.journal import JOURNAL_FILE, WORK_DIR
from tests.conftest import ROOT

FAILPOINTS = ("shard-write", "before-journal", "after-journal", "before-propagate", "inputs-save")


def compress_argv(model, out, calib, *extra: str) -> list[str]:
    return ["compress", "--model", str(model), "--out", str(out), "--calib", str(calib), "--nsamples", "4",
            "--seqlen", "32", "--device", "cpu", "--max-shard-size", "30KB", *extra]


def run_cli(argv: list[str], failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LAYERPRESS_FAILPOINT", None)
    if failpoint:
        env["LAYERPRESS_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "main.py", "-q", *argv], cwd=ROOT, env=env, capture_output=True, text=True)


def output_digest(out) -> dict[str, str]:
    """sha256 of every file a complete output holds (the journal aside): equal digests = bit-identical outputs."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out.iterdir())
        if path.is_file()
    }


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoints, tmp_path_factory):
    """The reference output of an uninterrupted sparsegpt run on tiny Llama."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    calib = tmp / "calib.txt"
    calib.write_text((ROOT / "data" / "wikitext2-valid.tokens").read_text(encoding="utf-8")[:50_000])
    out = tmp / "out"
    assert main.main(compress_argv(tiny_checkpoints["llama"], out, calib, "--method", "sparsegpt")) == 0
    return calib, output_digest(out)


def test_killed_five_times_at_random_points_resumes_bit_identical(tiny_checkpoints, tmp_path, uninterrupted):
    calib, expected = uninterrupted
    out = tmp_path / "out"
    argv = compress_argv(tiny_checkpoints["llama"], out, calib, "--method", "sparsegpt")
    rng = random.Random(1234)
    kill_points = ["shard-write:3", "after-journal:1"]  # inside a shard write; between journal and next block
    kill_points += [f"{rng.choice(FAILPOINTS)}:{rng.randint(1, 2)}" for _ in range(4)]
    for point in kill_points:
        result = run_cli(argv, failpoint=point)
        assert result.returncode == -9, f"{point} should have killed the run: {result.stderr}"
        assert not (out / "model.safetensors.index.json").exists(), "a killed run must not look complete"
    final = run_cli(argv)
    assert final.returncode == 0, final.stderr
    assert output_digest(out) == expected


def test_full_disk_leaves_a_resumable_run(tiny_checkpoints, tmp_path, uninterrupted, monkeypatch, capsys):
    calib, expected = uninterrupted
    out = tmp_path / "out"
    argv = compress_argv(tiny_checkpoints["llama"], out, calib, "--method", "sparsegpt")
    monkeypatch.setattr(failpoints, "_hits", failpoints.Counter())
    monkeypatch.setenv("LAYERPRESS_FAILPOINT", "shard-write:12:enospc")
    assert main.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("layerpress: error: disk full") and "\n" not in error
    assert not (out / "model.safetensors.index.json").exists()
    monkeypatch.delenv("LAYERPRESS_FAILPOINT")
    assert main.main(argv) == 0
    assert output_digest(out) == expected


def test_other_settings_are_refused_and_restart_discards(tiny_checkpoints, tmp_path, calib_text, capsys):
    out = tmp_path / "out"
    model = tiny_checkpoints["llama"]
    killed = run_cli(compress_argv(model, out, calib_text, "--method", "wanda"), failpoint="after-journal:1")
    assert killed.returncode == -9
    assert main.main(compress_argv(model, out, calib_text, "--method", "sparsegpt", "--sparsity", "0.6")) == 1
    error = capsys.readouterr().err
    assert "method was 'wanda', now 'sparsegpt'" in error and "sparsity was 0.5, now 0.6" in error
    assert "--restart" in error
    assert main.main(compress_argv(model, out, calib_text, "--method", "sparsegpt", "--seed", "1")) == 1
    assert "calibration" in capsys.readouterr().err

    restarted = compress_argv(model, out, calib_text, "--method", "sparsegpt", "--sparsity", "0.6", "--restart")
    assert main.main(restarted) == 0
    fresh = tmp_path / "fresh"
    assert main.main(compress_argv(model, fresh, calib_text, "--method", "sparsegpt", "--sparsity", "0.6")) == 0
    assert output_digest(out) == output_digest(fresh)


def test_changed_input_checkpoint_is_refused(tokenizer, tmp_path, calib_text, capsys):
    from tests.conftest import make_tiny_checkpoint

    model = make_tiny_checkpoint("opt", tmp_path / "model", tokenizer)
    out = tmp_path / "out"
    assert run_cli(compress_argv(model, out, calib_text), failpoint="after-journal:1").returncode == -9
    make_tiny_checkpoint("opt", model, tokenizer, seed=1)  # same shapes, new weights
    assert main.main(compress_argv(model, out, calib_text)) == 1
    assert "checkpoint was" in capsys.readouterr().err


def test_corrupt_journal_is_detected(tiny_checkpoints, tmp_path, calib_text, capsys):
    out = tmp_path / "out"
    argv = compress_argv(tiny_checkpoints["bloom"], out, calib_text)
    assert run_cli(argv, failpoint="after-journal:2").returncode == -9
    journal = out / WORK_DIR / JOURNAL_FILE
    data = json.loads(journal.read_text())
    data["body"]["blocks_done"] = 3
    journal.write_text(json.dumps(data))
    assert main.main(argv) == 1
    assert "corrupt progress journal" in capsys.readouterr().err
    assert main.main([*argv, "--restart"]) == 0


@pytest.mark.parametrize("variant", ["offloaded activations", "no prefetch"])
def test_io_variants_give_the_same_output(tiny_checkpoints, tmp_path, calib_text, variant):
    model = tiny_checkpoints["opt"]
    plain, varied = tmp_path / "plain", tmp_path / "varied"
    assert main.main(compress_argv(model, plain, calib_text, "--method", "sparsegpt")) == 0
    extra = ["--offload-activations", str(tmp_path / "acts")] if variant == "offloaded activations" else ["--no-prefetch"]
    assert main.main(compress_argv(model, varied, calib_text, "--method", "sparsegpt", *extra)) == 0
    assert output_digest(plain) == output_digest(varied)
    assert not list(tmp_path.glob("acts/*.bin")), "offloaded activations are removed at the end"


def test_status_reports_progress(tiny_checkpoints, tmp_path, calib_text, capsys):
    out = tmp_path / "out"
    assert run_cli(compress_argv(tiny_checkpoints["llama"], out, calib_text),
                   failpoint="after-journal:2").returncode == -9
    assert main.main(["status", str(out)]) == 0
    report = capsys.readouterr().out
    assert "compress running, 2 of 3 blocks done" in report and "left: 1 blocks" in report
    assert '"method": "sparsegpt"' in report
