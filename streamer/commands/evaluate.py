"""Perplexity, streamed block by block like compression: the model is never whole in memory.

perplexity = exp(mean token NLL) over non-overlapping `seqlen` windows of the tokenized text (each window
predicts its tokens 2..seqlen from the ones before; no window sees another).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ..data import capped_seqlen, evaluation_windows, load_text, load_tokenizer, tokenize
from ..decoded import open_checkpoint
from ..model import StagedModel
from ..stream import StreamOptions, stream_blocks

log = logging.getLogger("layerpress")


def perplexity(
    model: Path,
    data: str | Path,
    seqlen: int = 2048,
    windows: int | None = None,
    dtype: torch.dtype | None = None,
    options: StreamOptions | None = None,
) -> dict[str, float | int]:
    """{"ppl": ..., "windows": ..., "tokens": ...} of the model in `model` on the text `data`."""
    options = options or StreamOptions()
    checkpoint = open_checkpoint(model)
    staged = StagedModel(checkpoint, options.device, dtype)
    seqlen = capped_seqlen(seqlen, checkpoint.config)
    ids = evaluation_windows(tokenize(load_tokenizer(model), load_text(data)), seqlen, windows)
    acts = stream_blocks(staged, ids, options, process=lambda context: {}, desc="eval")
    nll, count = 0.0, 0
    with staged.final_stage() as logits_of, torch.no_grad():
        for batch in acts.batches():
            logits = logits_of(acts.inputs.data[batch].to(options.device)).float()
            targets = ids[batch, 1:].to(options.device)
            nll += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            count += targets.numel()
    result = {"ppl": math.exp(nll / count), "windows": len(ids), "tokens": ids.numel()}
    log.info("perplexity of %s: %.3f over %d windows of %d tokens", model, result["ppl"], len(ids), seqlen)
    return result
