"""Text in, token windows out: the calibration samples and the perplexity windows."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import LayerpressError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_CALIBRATION = DATA_DIR / "wikitext2-valid.tokens"
DEFAULT_EVALUATION = DATA_DIR / "wikitext2-test.raw"


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise LayerpressError(f"cannot load a tokenizer from {model_dir}: {exc}".splitlines()[0]) from exc


def load_text(source: str | Path) -> str:
    """A text file, a saved `datasets` directory, or a `datasets` spec NAME[:CONFIG[:SPLIT]] (text column joined)."""
    path = Path(source)
    if path.is_file():
        with open(path, encoding="utf-8", newline="") as handle:  # keep CRLF: tokens depend on every byte
            return handle.read()
    try:
        import datasets

        if path.is_dir():
            try:
                data = datasets.load_from_disk(str(path))
            except FileNotFoundError:
                data = datasets.load_dataset(str(path))
            split = None
        else:
            name, config, split = (str(source).split(":") + [None, None])[:3]
            data = datasets.load_dataset(name, config or None, split=split or "train")
        if isinstance(data, datasets.DatasetDict):
            split = "train" if "train" in data else next(iter(data))
            data = data[split]
        return "\n\n".join(data["text"])
    except Exception as exc:  # datasets raises many types; the user needs one line either way
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LayerpressError(f"cannot load text from {source!r}: {message}") from exc


def describe_source(source: str | Path) -> str:
    """How records name a text source: the bundled files by name, so a moved clone still resumes its runs."""
    path = Path(source)
    return f"bundled:{path.name}" if path.is_file() and path.resolve().parent == DATA_DIR else str(source)


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """The whole text as one sequence of token ids (no special tokens: windows are cut from running text)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random positions (fixed seed), shape (nsamples, seqlen)."""
    if nsamples < 1 or seqlen < 2:
        raise LayerpressError(f"need at least 1 calibration sample of 2 tokens, got {nsamples} x {seqlen}")
    if ids.numel() < seqlen:
        raise LayerpressError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([ids[start : start + seqlen] for start in starts.tolist()])


def evaluation_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping `seqlen` windows from the start of the text (the first `limit` of them)."""
    count = ids.numel() // seqlen
    if limit is not None:
        count = min(count, limit)
    if count < 1:
        raise LayerpressError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: count * seqlen].view(count, seqlen)


def windows_fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()


def capped_seqlen(requested: int, config: dict) -> int:
    """The window length, capped at the model's maximum positions where it has one."""
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    return min(requested, int(limit)) if limit else requested


@dataclass(frozen=True)
class Calibration:
    """A run's calibration windows, how records name them, and their fingerprint (both go into the journal)."""

    windows: torch.Tensor
    record: dict[str, Any]
    fingerprint: str


@dataclass(frozen=True)
class CalibrationOptions:
    """--calib, --nsamples, --seqlen, --seed: which windows every calibrated command draws, and how."""

    source: str | Path = DEFAULT_CALIBRATION
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def load(self, model_dir: Path, config: dict) -> Calibration:
        """The windows for the model in `model_dir` (seqlen capped at its positions), with record and fingerprint."""
        seqlen = capped_seqlen(self.seqlen, config)
        ids = tokenize(load_tokenizer(model_dir), load_text(self.source))
        windows = calibration_windows(ids, self.nsamples, seqlen, self.seed)
        record = {
            "source": describe_source(self.source), "nsamples": self.nsamples, "seqlen": seqlen, "seed": self.seed
        }
        return Calibration(windows, record, windows_fingerprint(windows))
