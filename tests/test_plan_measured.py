"""Each command's own plan against the peak RSS its process reaches, on a small model wide enough that the block,
its statistics and the method's working memory are a good part of the peak (the full-width figures, one OPT-66B
block per pass, come from `tools/bench_fullwidth.py passes`).

At full width every tensor is far above glibc's mmap threshold (at most 32 MiB), so freed memory goes back to the
system at once; a small model's tensors come from malloc arenas, which keep freed memory and fragment: its
reconstruction peaked 34% above its plan that way, and 0.7% below it with the threshold set to 128 KiB. The runs
here set it, so that they measure what the plan models at full width. Eval reads a short text: tokenizing all of
WikiText-2 test (1.3 MB) peaks at about 0.3 GiB before the pass, outside its plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tools.bench_stream import predicted_peak, run_measured

# Measured on this project's CPU machine (scores: 631 MiB planned, 624 measured); a ~0.6 GiB process of which ~0.4 GiB
# is torch and transformers.
TOLERANCE = 0.10
COMMANDS = {
    "scores": ["scores", "--sparsity", "0.5"],
    "gradients": ["gradients"],
    "eval": ["eval"],
    "reconstruct": ["compress", "--method", "wanda", "--reconstruct", "biases,norms,masklora", "--recon-steps", "4"],
}


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("wide-llama")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                         num_attention_heads=12, max_position_embeddings=256, attention_bias=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_plan_a_command_logs_is_its_measured_peak(wide_llama, tmp_path, calib_text, name, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    command, *options = COMMANDS[name]
    windows = ["--windows", "8", "--data", str(calib_text)] if command == "eval" else [
        "--nsamples", "8", "--calib", str(calib_text), "--out", str(tmp_path / "out")]
    result = run_measured([command, "--model", str(wide_llama), "--seqlen", "128", "--device", "cpu", *windows,
                           *options])
    planned, measured = predicted_peak(result["output"]), result["peak_rss_mib"] * 2**20
    assert abs(planned - measured) <= TOLERANCE * measured, f"planned {planned / 2**20:.0f} MiB, measured " \
                                                            f"{measured / 2**20:.0f} MiB"
