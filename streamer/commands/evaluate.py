"""Perplexity, streamed block by block like compression: the model is never whole in memory.

perplexity = exp(mean token NLL) over non-overlapping `seqlen` windows of the tokenized text (each window
predicts its tokens 2..seqlen from the ones before; no window sees another).
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from methods import Target

from ..data import capped_seqlen, evaluation_windows, load_text, load_tokenizer, tokenize
from ..decoded import open_checkpoint
from ..distributed import world
from ..model import StagedModel
from ..planner import Workload
from ..stream import StreamOptions, stream_blocks
from .planning import PlanChoices, plan_pass, planned_stream

log = logging.getLogger("layerpress")


def perplexity(
    model: Path,
    data: str | Path,
    seqlen: int = 2048,
    windows: int | None = None,
    dtype: torch.dtype | None = None,
    options: StreamOptions | None = None,
    planning: PlanChoices | None = None,
) -> dict[str, float | int]:
    """{"ppl": ..., "windows": ..., "tokens": ...} of the model in `model` on the text `data`.

    planning: the memory plan's fixed settings and budget (None: options' micro-batch and activation place as
    given, unplanned)."""
    options = options or StreamOptions()
    checkpoint = open_checkpoint(model)
    staged = StagedModel(checkpoint, options.device, dtype)
    seqlen = capped_seqlen(seqlen, checkpoint.config)
    ids = evaluation_windows(tokenize(load_tokenizer(model), load_text(data)), seqlen, windows)
    with ExitStack() as cleanup:
        if planning is not None:
            workload = Workload(None, Target(), len(ids), seqlen, command="eval", world_size=world().size)
            plan = plan_pass(staged, workload, options, planning)
            if plan.choice.activations == "disk" and options.offload_dir is None:  # no output directory to use
                scratch = cleanup.enter_context(TemporaryDirectory(prefix="layerpress-eval-"))
                options = replace(options, offload_dir=Path(scratch))
            options = planned_stream(options, plan, out=None)
        return _perplexity(model, staged, ids, options)


def _perplexity(model: Path, staged: StagedModel, ids: torch.Tensor, options: StreamOptions) -> dict[str, float | int]:
    """Under torchrun each rank takes its share of the windows (as stream_blocks does) and the sums are totalled."""
    seqlen = ids.shape[1]
    acts = stream_blocks(staged, ids, options, process=lambda context: {}, desc="eval")
    ranks = world()
    own = ids[ranks.share(len(ids))]
    nll, count = 0.0, 0
    with staged.final_stage() as logits_of, torch.no_grad():
        for batch in acts.batches():
            logits = logits_of(acts.inputs.data[batch].to(options.device)).float()
            targets = own[batch, 1:].to(options.device)
            nll += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            count += targets.numel()
    if ranks.distributed:
        totals = ranks.total(torch.tensor([nll, count], dtype=torch.float64, device=options.device))
        nll, count = totals[0].item(), int(totals[1].item())
    result = {"ppl": math.exp(nll / count), "windows": len(ids), "tokens": ids.numel()}
    log.info("perplexity of %s: %.3f over %d windows of %d tokens", model, result["ppl"], len(ids), seqlen)
    return result
