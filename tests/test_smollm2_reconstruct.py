"""Reconstruction on the real model: SmolLM2-135M, magnitude pruning 50%, with and without --reconstruct.

Marked slow; small on purpose (8 windows x 512 for calibration and evaluation, 8 steps per block) so that it stays
around a minute on two CPU cores.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

import main
from tests.conftest import ROOT
from tools.convert_gguf import bundled_smollm2, convert

pytestmark = pytest.mark.slow
WINDOWS = ["--seqlen", "512", "--device", "cpu"]


@pytest.fixture(scope="module")
def smollm2():
    """The converted checkpoint, made once and kept under checkpoints/ (git-ignored) for later runs."""
    directory = ROOT / "checkpoints" / "smollm2-135m"
    convert(bundled_smollm2(), directory, torch.float32, "100MB")
    return directory


def perplexity(model) -> float:
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        assert main.main(["-q", "eval", "--model", str(model), "--windows", "8", *WINDOWS]) == 0
    return json.loads(captured.getvalue().splitlines()[-1])["ppl"]


def test_reconstruction_repairs_magnitude_pruning(smollm2, tmp_path):
    ppl = {}
    runs = {"plain": [], "reconstructed": ["--reconstruct", "biases,norms,masklora", "--recon-steps", "8"]}
    for name, extra in runs.items():
        out = tmp_path / name
        assert main.main(["-q", "compress", "--model", str(smollm2), "--out", str(out), "--method", "magnitude",
                          "--sparsity", "0.5", "--nsamples", "8", *WINDOWS, *extra]) == 0
        ppl[name] = perplexity(out)
    print(f"SmolLM2 magnitude 50%, 8x512 perplexity: {ppl}")
    assert ppl["reconstructed"] < 0.5 * ppl["plain"], ppl
