"""Each command's own plan against the peak RSS its process reaches, on a small model wide enough that the block,
its statistics and the method's working memory are a good part of the peak (the full-width figures, one OPT-66B
block per pass, come from `tools/bench_fullwidth.py passes`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tools.bench_stream import predicted_peak, run_measured

# Measured on this project's CPU machine; the tolerance covers glibc's arenas and torch's allocator caches, which
# the plan does not model, on a ~0.6 GiB process of which ~0.45 GiB is torch and transformers.
TOLERANCE = 0.15
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
def test_the_plan_a_command_logs_is_its_measured_peak(wide_llama, tmp_path, calib_text, name):
    command, *options = COMMANDS[name]
    windows = ["--windows", "8"] if command == "eval" else ["--nsamples", "8", "--calib", str(calib_text),
                                                            "--out", str(tmp_path / "out")]
    result = run_measured([command, "--model", str(wide_llama), "--seqlen", "128", "--device", "cpu", *windows,
                           *options])
    planned, measured = predicted_peak(result["output"]), result["peak_rss_mib"] * 2**20
    assert abs(planned - measured) <= TOLERANCE * measured, f"planned {planned / 2**20:.0f} MiB, measured " \
                                                            f"{measured / 2**20:.0f} MiB"
