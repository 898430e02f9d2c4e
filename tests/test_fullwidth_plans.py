"""Every pass fits one A100-80GB with 64 GiB of host RAM at 175B-176B width, 128 x 2048 calibration: planned from
shape-only checkpoints (config.json and shard headers over holes), as `plan` reads nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import BloomConfig, OPTConfig

import main
from tools.bench_fullwidth import PASSES, write_shape_only

ROOT = Path(__file__).resolve().parent.parent
A100 = ["--device", "cuda", "--device-memory", "80GiB", "--host-memory", "64GiB",
        "--speed", str(ROOT / "tools" / "speeds" / "a100-80gb-assumed.json")]
CALIBRATION = ["--nsamples", "128", "--seqlen", "2048"]
CONFIGS = {
    "opt-175b": OPTConfig(vocab_size=50272, hidden_size=12288, ffn_dim=49152, num_hidden_layers=96,
                          num_attention_heads=96, max_position_embeddings=2048, word_embed_proj_dim=12288,
                          dtype="float16"),
    "bloom-176b": BloomConfig(vocab_size=250880, hidden_size=14336, n_layer=70, n_head=112, dtype="float16"),
}


@pytest.fixture(scope="module")
def full_width(tmp_path_factory) -> dict[str, Path]:
    models = {}
    for name, config in CONFIGS.items():
        models[name] = tmp_path_factory.mktemp(name)
        write_shape_only(config, models[name])
    return models


def plan_argv(model: Path, name: str) -> list[str]:
    command, *options = PASSES[name]
    windows = ["--windows", "128", "--seqlen", "2048"] if command == "eval" else CALIBRATION
    return ["plan", command, "--model", str(model), *windows, *options, *A100]


@pytest.mark.parametrize("model", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_pass_fits_one_a100_at_full_width(full_width, model, name, capsys):
    assert main.main(plan_argv(full_width[model], name)) == 0
    printed = capsys.readouterr().out
    assert f"plan of {PASSES[name][0]}: {model.split('-')[0]}" in printed
    assert "settings that fit" in printed and "time: about" in printed


def test_a_pass_that_cannot_fit_is_refused_with_its_largest_parts(full_width, capsys):
    argv = [arg if arg != "80GiB" else "24GiB" for arg in plan_argv(full_width["bloom-176b"], "scores")]
    assert main.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert error.startswith("layerpress: error: the run cannot fit: score needs") and "largest: method working" in error


def test_plan_without_a_command_plans_compress(full_width, capsys):
    model = str(full_width["opt-175b"])
    assert main.main(["plan", "--model", model, *CALIBRATION, "--method", "wanda", *A100]) == 0
    assert "plan of compress: opt, 96 blocks, wanda 50%" in capsys.readouterr().out
