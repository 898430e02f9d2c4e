"""Reconstruction on the real model: SmolLM2-135M, magnitude pruning 50%, with and without --reconstruct.

Marked slow; small on purpose (8 windows x 512 for calibration and evaluation, 8 steps per block) so that it stays
around a minute on two CPU cores.
"""

from __future__ import annotations

import pytest

import main
from tests.conftest import perplexity

pytestmark = pytest.mark.slow
WINDOWS = ["--seqlen", "512", "--device", "cpu"]


def test_reconstruction_repairs_magnitude_pruning(smollm2, tmp_path):
    ppl = {}
    runs = {"plain": [], "reconstructed": ["--reconstruct", "biases,norms,masklora", "--recon-steps", "8"]}
    for name, extra in runs.items():
        out = tmp_path / name
        assert main.main(["-q", "compress", "--model", str(smollm2), "--out", str(out), "--method", "magnitude",
                          "--sparsity", "0.5", "--nsamples", "8", *WINDOWS, *extra]) == 0
        ppl[name] = perplexity(out, 8)
    print(f"SmolLM2 magnitude 50%, 8x512 perplexity: {ppl}")
    assert ppl["reconstructed"] < 0.5 * ppl["plain"], ppl
