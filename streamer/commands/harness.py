"""Zero-shot lm-evaluation-harness tasks on a streamed model: log-likelihoods without the model ever whole in memory.

lm-eval builds every task's requests and computes the metrics; this module is only its model (`LayerpressLM`,
registered as `layerpress`, so `lm_eval --model layerpress --model_args pretrained=DIR` works once it is imported:
the `layerpress-lm-eval` script does that). lm-eval hands over all requests of one kind at once, and they are
answered in one streamed pass:

    tokenize as lm-eval's HF backend ─► distinct inputs, longest first, right-padded ─► block 1, block 2, …
    (stream_blocks, activations where the plan fits them) ─► the head on the continuations only ─► (log p, greedy)

Right padding under a causal mask changes no real token's states, and a micro-batch runs on its longest request's
tokens only. Each pass is a resumable run (commands/lifecycle.py) in a work directory named by the digest of its
requests: a killed evaluation, run again, resumes at its first unfinished block, and a finished pass's scores are
read back from its journal, so the results are identical.

Under torchrun each rank streams its contiguous share of the distinct inputs (stream_blocks shares them as it shares
calibration windows) and scores their requests; the scores are gathered, rank 0 journals them, and every rank hands
lm-eval the same list, so every rank computes the same metrics (rank 0 prints them). The work directory must be one
every rank sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.api.task import Task
from lm_eval.models.utils import has_bos_prefix, resolve_max_length
from lm_eval.tasks import TaskManager, get_task_dict
from lm_eval.utils import (
    get_rolling_token_windows, handle_non_serializable, make_disjoint_window, simple_parse_args_string,
)

from methods import Target

from ..checkpoint import Checkpoint
from ..data import load_tokenizer
from ..decoded import open_checkpoint
from ..distributed import world
from ..errors import LayerpressError
from ..journal import Run, read_journal
from ..model import StagedModel
from ..planner import Workload
from ..stream import StreamOptions, remove_offloaded_activations, stream_blocks
from .lifecycle import RunRequest
from .planning import PlanChoices, plan_pass, planned_stream

log = logging.getLogger("layerpress")

DEFAULT_MAX_LENGTH = 2048  # lm-eval's HF backend's, for models whose config and tokenizer name none
TokenRequest = tuple[Any, list[int], list[int]]  # (what lm-eval caches it under, context tokens, continuation tokens)
Readers = dict[tuple[int, ...], list[int]]  # a distinct model input -> the requests that read it


@register_model("layerpress")
class LayerpressLM(TemplateLM):
    """lm-eval's model interface on a checkpoint streamed block by block (dense, packed, sparse or FLAP outputs)."""

    def __init__(
        self,
        model: Path,
        options: StreamOptions | None = None,
        work: Path | None = None,
        dtype: torch.dtype | None = None,
        max_length: int | None = None,
        restart: bool = False,
        planning: PlanChoices | None = None,
    ):
        """work: where the passes' journals and activations go (None: a temporary directory, not resumable);
        restart: redo the passes found there instead of resuming them; planning: what the user fixed of each
        pass's memory plan (None: the options' micro-batch, the machine's memory)."""
        super().__init__()
        self.model_dir, self.restart = Path(model), restart
        self.options = options or StreamOptions()
        self.planning = planning or PlanChoices(micro_batch=self.options.micro_batch)
        self.checkpoint = open_checkpoint(self.model_dir)
        self.staged = StagedModel(self.checkpoint, self.options.device, dtype)
        self.tokenizer = load_tokenizer(self.model_dir)
        self._temporary = tempfile.TemporaryDirectory(prefix="layerpress-eval-") if work is None else None
        if self._temporary:
            log.info("no work directory given: the evaluation is not resumable")
        self.work = Path(self._temporary.name) if self._temporary else Path(work)
        self._max_length = max_length or resolve_max_length(self.staged.config, self.tokenizer,
                                                            default=DEFAULT_MAX_LENGTH)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LayerpressLM":
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> "LayerpressLM":
        """From lm-eval's `--model_args pretrained=DIR[,work=DIR,dtype=float32,max_length=N,offload=DIR]` and its
        --device and --batch_size (requests per block forward; "auto": the largest the memory plan fits)."""
        args = {**arg_dict, **{key: value for key, value in (additional_config or {}).items() if value is not None}}
        if "pretrained" not in args:
            raise LayerpressError("--model layerpress needs --model_args pretrained=DIR")
        batch = str(args.get("batch_size", "auto"))
        options = StreamOptions(
            device=torch.device(str(args.get("device") or "cpu")),
            offload_dir=Path(str(args["offload"])) if args.get("offload") else None,
        )
        dtype = getattr(torch, str(args["dtype"])) if args.get("dtype") else None
        return cls(Path(str(args["pretrained"])), options, Path(str(args["work"])) if args.get("work") else None,
                   dtype, int(args["max_length"]) if args.get("max_length") else None,
                   planning=PlanChoices(micro_batch=int(batch) if batch.isdigit() else None))

    # ---------------------------------------------------------------- what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and a rolling window) starts with: BOS if the tokenizer has one, as lm-eval's HF
        backend does."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The tokens lm-eval's HF backend gives: the tokenizer's own special tokens unless told otherwise, none
        added to a string that starts with the prefix token already."""
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood: the sum over its disjoint rolling windows (lm-eval's own windowing), all
        documents' windows in one streamed pass."""
        windows, owners = [], []
        for owner, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1,
            )):
                windows.append((None, context, continuation))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score(windows, "loglikelihood_rolling")):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _loglikelihood_tokens(self, requests: list[TokenRequest], **kwargs: Any) -> list[tuple[float, bool]]:
        scores = self._score(requests, "loglikelihood")
        for (key, _, _), score in zip(requests, scores):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, score)
        return scores

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        raise LayerpressError(generation_refused(sorted({request.task_name for request in requests})))

    # ---------------------------------------------------------------- the streamed pass
    def _score(self, requests: list[TokenRequest], kind: str) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether it is the greedy continuation) of every request, from one
        resumable streamed pass over all of them."""
        if not requests:
            return []
        inputs, continuations = zip(*(self._model_input(context, continuation)
                                      for _, context, continuation in requests))
        digest = hashlib.sha256(json.dumps([inputs, continuations]).encode()).hexdigest()
        out = self.work / f"{kind}-{digest[:16]}"
        readers = distinct_inputs(inputs)
        options = self._planned(readers, out)  # a resumed pass keeps its micro-batch: the same rounding
        settings = {"kind": kind, "requests": len(requests), "digest": digest, "dtype": str(self.staged.dtype),
                    "max_length": self.max_length, "micro_batch": options.micro_batch}

        def work(run: Run) -> None:
            clock = time.perf_counter()
            scores = stream_and_score(self.staged, readers, list(continuations), options, run)
            remove_offloaded_activations(options)
            run.finish({"seconds": time.perf_counter() - clock, "scores": scores})  # `status` reads the seconds

        RunRequest("eval-tasks", out, self.model_dir, self.restart).execute(
            settings, {"checkpoint": self.checkpoint.fingerprint()}, self.staged.num_blocks, work)
        world().barrier()  # under torchrun: rank 0 has journaled the scores
        return [(float(logprob), bool(greedy)) for logprob, greedy in read_journal(out)["summary"]["scores"]]

    def _planned(self, readers: Readers, out: Path) -> StreamOptions:
        """The pass's stream options from its memory plan, made as every command makes it (a forward-only pass
        over the distinct inputs): its micro-batch unless fixed; activations on the device or in RAM when they fit,
        else in files in the pass's work directory (--offload-activations puts them there in any case)."""
        workload = Workload(None, Target(), len(readers), max(map(len, readers)), command="eval",
                            world_size=world().size)
        options = self.options if self.options.offload_dir is None else \
            replace(self.options, offload_dir=self.options.offload_dir / out.name)
        return planned_stream(options, plan_pass(self.staged, workload, options, self.planning, out, self.restart),
                              out)

    def _model_input(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """The tokens the model reads (context + continuation less its last, left-truncated to max_length, as
        lm-eval's HF backend cuts them) and the continuation they predict at their end."""
        if len(continuation) > self.max_length:
            raise LayerpressError(f"a continuation of {len(continuation)} tokens exceeds the model's maximum length "
                                  f"of {self.max_length}")
        return (context + continuation)[-(self.max_length + 1):][:-1], continuation


def distinct_inputs(inputs: list[list[int]]) -> Readers:
    """Each distinct model input once, with the requests that read it (the choices of a multiple-choice question
    with one-token answers share theirs)."""
    readers: Readers = {}
    for request, tokens in enumerate(inputs):
        readers.setdefault(tuple(tokens), []).append(request)
    return readers


def stream_and_score(
    staged: StagedModel, readers: Readers, continuations: list[list[int]], options: StreamOptions,
    run: Run | None = None,
) -> list[tuple[float, bool]]:
    """Run each distinct input once, right-padded, longest first, through every block; then score each request's
    continuation at the head (its tokens' log-softmax, micro-batch by micro-batch). Results in the requests'
    order (under torchrun each rank scores its share of the inputs; every rank returns all scores)."""
    distinct = sorted(readers, key=len, reverse=True)
    lengths = [len(tokens) for tokens in distinct]
    log.info("lm-eval: %d requests, %d distinct inputs of %d to %d tokens", len(continuations), len(distinct),
             lengths[-1], lengths[0])
    windows = torch.zeros(len(distinct), lengths[0], dtype=torch.long)  # the padding token is never attended to
    for row, tokens in enumerate(distinct):
        windows[row, : lengths[row]] = torch.tensor(tokens)
    acts = stream_blocks(staged, windows, options, process=lambda context: {}, run=run, desc="lm-eval",
                         lengths=lengths)
    ranks = world()
    first = ranks.share(len(distinct)).start  # this rank's first input (its activations' row 0)
    scores: dict[int, tuple[float, bool]] = {}
    with staged.final_stage() as logits_of, torch.no_grad():
        for batch in acts.batches():
            scored = [(row, request) for row in range(batch.start, batch.stop)
                      for request in readers[distinct[first + row]]]
            spans = [slice(lengths[first + row] - len(continuations[request]), lengths[first + row])
                     for row, request in scored]
            hidden = torch.cat([acts.inputs.data[row, span] for (row, _), span in zip(scored, spans)])
            logprobs = torch.log_softmax(logits_of(hidden.to(options.device)).float(), dim=-1).cpu()
            start = 0
            for _, request in scored:
                targets = torch.tensor(continuations[request])
                predicted = logprobs[start : start + len(targets)]
                start += len(targets)
                scores[request] = (predicted.gather(1, targets[:, None]).sum().item(),
                                   bool((predicted.argmax(-1) == targets).all()))
    for share in ranks.gather(scores):  # one process: its own scores
        scores.update(share)
    return [scores[request] for request in range(len(continuations))]


def generation_refused(tasks: list[str]) -> str:
    return (f"task {', '.join(tasks)} generates text (generate_until), which the streamed eval does not do: "
            "it scores log-likelihoods (multiple choice, loglikelihood, loglikelihood_rolling tasks) only")


def task_manager(tasks: list[str], include_path: Path | None) -> TaskManager:
    """Tasks in `include_path` are found without indexing lm-eval's thousands of built-in ones (seconds), which are
    indexed only when a task is not there."""
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


def _leaf_tasks(tasks: dict) -> Iterator[Task]:
    for value in tasks.values():
        yield from _leaf_tasks(value) if isinstance(value, dict) else [value]


def evaluate_tasks(
    model: Path, tasks: list[str], work: Path | None = None, options: StreamOptions | None = None,
    dtype: torch.dtype | None = None, limit: int | None = None, num_fewshot: int | None = None,
    include_path: Path | None = None, bootstrap_iters: int = 100_000, max_length: int | None = None,
    restart: bool = False, planning: PlanChoices | None = None,
) -> dict[str, Any] | None:
    """lm-eval's results of `tasks` on the streamed model (its simple_evaluate's dict, samples included), with our
    model record under "layerpress" (None on the processes lm-eval does not report on). Generation tasks are
    refused before any work."""
    manager = task_manager(tasks, include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise LayerpressError(f"lm-eval knows no task {', '.join(unknown)} (local tasks: --include-path DIR)")
    generating = sorted(task.config.task for task in _leaf_tasks(get_task_dict(tasks, manager))
                        if task.OUTPUT_TYPE == "generate_until")
    if generating:
        raise LayerpressError(generation_refused(generating))
    lm = LayerpressLM(model, options, work, dtype, max_length, restart, planning)
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              bootstrap_iters=bootstrap_iters, log_samples=True)
    if results is None:  # under torchrun lm-eval reports on each node's first process only
        return None
    results["layerpress"] = model_record(model)
    return results


def model_record(model: Path) -> dict[str, Any]:
    """What layerpress knows of the model: the output's layerpress record and its compression's journal summary."""
    compression = read_journal(model)
    return {
        "model": str(model),
        "record": Checkpoint(model).config.get("layerpress"),
        "compression": compression.get("summary") if compression else None,
    }


def write_results(results: dict[str, Any], path: Path, samples: bool = False) -> None:
    """lm-eval's JSON layout (its own serializer for what JSON lacks); the per-request samples only if asked."""
    kept = results if samples else {key: value for key, value in results.items() if key != "samples"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept, indent=2, default=handle_non_serializable, ensure_ascii=False))


def lm_eval_entry_point() -> None:
    """The `layerpress-lm-eval` console script: lm-eval's own command line, with `--model layerpress` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
