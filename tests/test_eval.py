"""Streamed perplexity equals the whole model's, for every family; the text is cut as the references cut it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import main
from streamer.data import calibration_windows, evaluation_windows, load_text, load_tokenizer, tokenize
from tests.conftest import FAMILIES, ROOT


def whole_model_perplexity(model_dir, windows: torch.Tensor) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(windows).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(nll.item())


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_perplexity_equals_the_whole_models(tiny_checkpoints, capsys, family):
    model = tiny_checkpoints[family]
    assert main.main(["eval", "--model", str(model), "--seqlen", "64", "--windows", "3", "--micro-batch", "2",
                      "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["windows"] == 3 and result["tokens"] == 192
    ids = evaluation_windows(tokenize(load_tokenizer(model), load_text(ROOT / "data" / "wikitext2-test.raw")), 64, 3)
    assert result["ppl"] == pytest.approx(whole_model_perplexity(model, ids), rel=1e-5)


def test_windows_follow_the_reference_conventions():
    ids = torch.arange(1000)
    windows = evaluation_windows(ids, 64)
    assert windows.shape == (15, 64) and torch.equal(windows.flatten(), ids[:960])
    assert evaluation_windows(ids, 64, limit=4).shape == (4, 64)
    first = calibration_windows(ids, 8, 100, seed=0)
    assert torch.equal(first, calibration_windows(ids, 8, 100, seed=0))
    assert not torch.equal(first, calibration_windows(ids, 8, 100, seed=1))
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 100)) for row in first)


def test_test_text_keeps_its_crlf_line_endings():
    assert "\r\n" in load_text(ROOT / "data" / "wikitext2-test.raw")


def test_calibration_from_a_saved_datasets_directory(tiny_checkpoints, tmp_path):
    saved = tmp_path / "dataset"
    Dataset.from_dict({"text": ["first document", "second document"]}).save_to_disk(saved)
    assert load_text(saved) == "first document\n\nsecond document"
    assert main.main(["compress", "--model", str(tiny_checkpoints["opt"]), "--out", str(tmp_path / "out"),
                      "--calib", str(saved), "--nsamples", "2", "--seqlen", "4", "--device", "cpu",
                      "--method", "wanda"]) == 0
