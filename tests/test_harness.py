"""lm-evaluation-harness tasks, streamed: the same log-likelihoods and metrics as lm-eval's own HF backend on the
whole model, for every family and for compressed outputs; a killed evaluation resumes to identical results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

import main  # noqa: E402
import streamer.commands.harness as harness  # noqa: E402
from methods import Target  # noqa: E402
from streamer.checkpoint import Checkpoint  # noqa: E402
from streamer.commands.harness import LayerpressLM, distinct_inputs, stream_and_score, task_manager  # noqa: E402
from streamer.commands.planning import PlanChoices  # noqa: E402
from streamer.data import load_tokenizer  # noqa: E402
from streamer.errors import LayerpressError  # noqa: E402
from streamer.journal import WORK_DIR, read_journal  # noqa: E402
from streamer.model import StagedModel, load_model  # noqa: E402
from streamer.planner import Budget, Workload, plan_run  # noqa: E402
from streamer.stream import StreamOptions, stream_blocks  # noqa: E402
from tests.conftest import FAMILIES, ROOT  # noqa: E402

TASKS_DIR = ROOT / "tests" / "tasks"
MULTIPLE_CHOICE, LOGLIKELIHOOD, ROLLING = "layerpress_cloze_mc", "layerpress_cloze_ll", "layerpress_cloze_rolling"
TASKS = [MULTIPLE_CHOICE, LOGLIKELIHOOD, ROLLING]
MAX_LENGTH = 8  # shorter than most requests: left truncation and documents of several rolling windows happen
BOOTSTRAP = 10


@pytest.fixture(autouse=True)
def from_the_repository_root(monkeypatch):
    """The task YAMLs name their data relative to the repository root; bootstraps run in this process."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")


def eval_argv(model: Path, output: Path, tasks: list[str], *extra: str) -> list[str]:
    return ["-q", "eval", "--model", str(model), "--tasks", ",".join(tasks), "--include-path", str(TASKS_DIR),
            "--output", str(output), "--log-samples", "--micro-batch", "3", "--device", "cpu",
            "--bootstrap-iters", str(BOOTSTRAP), *extra]


def streamed(model: Path, output: Path, tasks: list[str], *extra: str) -> dict:
    """The results file of `main.py eval --tasks` on `model`."""
    assert main.main(eval_argv(model, output, tasks, *extra)) == 0
    return json.loads(output.read_text())


def hf_backend(pretrained, tasks: list[str], max_length: int | None = MAX_LENGTH, limit: int | None = None,
               num_fewshot: int | None = None, **model_args) -> dict:
    """lm-eval's own HF backend on the whole model: float32, batch size 1."""
    lm = HFLM(pretrained=pretrained, dtype="float32", batch_size=1, device="cpu", max_length=max_length, **model_args)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager(tasks, TASKS_DIR), limit=limit,
                           num_fewshot=num_fewshot, bootstrap_iters=BOOTSTRAP, log_samples=True)


def leaves(value) -> list:
    """The numbers and flags of a response, whatever nesting (tuples in memory, lists in JSON) holds them."""
    return [leaf for item in value for leaf in leaves(item)] if isinstance(value, (list, tuple)) else [value]


def assert_same_results(ours: dict, theirs: dict, tasks: list[str]) -> None:
    """Every request's log-likelihood (and greedy flag), and every metric, to float rounding."""
    for task in tasks:
        mine = {sample["doc_id"]: leaves(sample["resps"]) for sample in ours["samples"][task]}
        reference = {sample["doc_id"]: leaves(sample["resps"]) for sample in theirs["samples"][task]}
        assert mine.keys() == reference.keys() and mine
        for doc, values in reference.items():
            assert mine[doc] == pytest.approx(values, rel=1e-5, abs=1e-5), (task, doc)
        for metric, value in theirs["results"][task].items():
            expected = pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
            assert ours["results"][task][metric] == expected, (task, metric)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_tasks_equal_lm_evals_hf_backend(tiny_checkpoints, tmp_path, family):
    model = tiny_checkpoints[family]
    texts = [json.loads(line)["text"] for line in (TASKS_DIR / "cloze.jsonl").read_text().splitlines()]
    assert max(len(load_tokenizer(model).encode(text)) for text in texts) > 2 * MAX_LENGTH  # several windows
    on_disk = ["--offload-activations", str(tmp_path / "activations")] if family == "opt" else []  # RAM otherwise
    limit, shots = (10, 2) if family == "bloom" else (None, None)  # documents, few-shot examples
    chosen = ["--limit", str(limit), "--num-fewshot", str(shots)] if limit else []
    ours = streamed(model, tmp_path / "results.json", TASKS, "--max-length", str(MAX_LENGTH), *on_disk, *chosen)
    assert_same_results(ours, hf_backend(str(model), TASKS, limit=limit, num_fewshot=shots), TASKS)
    assert len(ours["samples"][MULTIPLE_CHOICE]) == (limit or 24) and ours["n-shot"][MULTIPLE_CHOICE] == (shots or 0)
    assert not list((tmp_path / "activations").rglob("*.bin"))  # a finished pass removes its activation files
    assert ours["layerpress"]["model"] == str(model) and ours["layerpress"]["record"] is None
    assert set(ours["results"]) == set(TASKS) and "acc_stderr,none" in ours["results"][MULTIPLE_CHOICE]


def whole_model_scores(model: Path, inputs: list[list[int]], continuations: list[list[int]]) -> list:
    """(log p, greedy) of each request from the whole model's forward of its input alone."""
    whole, scores = load_model(model), []
    for tokens, continuation in zip(inputs, continuations):
        with torch.no_grad():
            logprobs = torch.log_softmax(whole(torch.tensor([tokens])).logits[0, -len(continuation):], dim=-1)
        scores.append((logprobs[range(len(continuation)), continuation].sum().item(),
                       bool((logprobs.argmax(-1) == torch.tensor(continuation)).all())))
    return scores


def assert_same_scores(scores: list, expected: list) -> None:
    assert [greedy for _, greedy in scores] == [greedy for _, greedy in expected]
    assert [logprob for logprob, _ in scores] == pytest.approx([logprob for logprob, _ in expected], rel=1e-5)


def test_requests_sharing_an_input_run_it_once_and_score_from_it(tiny_checkpoints, monkeypatch):
    """Choices with one-token answers share their input (the question): one row, each choice scored from it."""
    model, streamed_rows = tiny_checkpoints["llama"], []
    monkeypatch.setattr(harness, "stream_blocks", lambda staged, windows, *args, **kwargs: (
        streamed_rows.append(len(windows)) or stream_blocks(staged, windows, *args, **kwargs)))
    inputs, continuations = [[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7], [9]], [[10], [11], [7, 12], [13]]
    scores = stream_and_score(StagedModel(Checkpoint(model), torch.device("cpu")), distinct_inputs(inputs),
                              continuations, StreamOptions(micro_batch=2))
    assert streamed_rows == [3]
    assert_same_scores(scores, whole_model_scores(model, inputs, continuations))


def test_the_plan_offloads_activations_that_do_not_fit_in_ram(tiny_checkpoints, tmp_path):
    model = tiny_checkpoints["llama"]
    inputs = [[(7 * row + column) % 300 + 3 for column in range(6 + row % 5)] for row in range(40)]
    continuations = [tokens[-2:] for tokens in inputs]  # each input predicts its own last tokens
    readers = distinct_inputs(inputs)
    staged = StagedModel(Checkpoint(model), torch.device("cpu"))
    peaks = {offload: plan_run(staged, Workload(None, Target(), len(readers), 10, command="eval"), "cpu",
                               Budget(2**40, 2**40), 1, micro_batch=4, offload=offload).host_peak
             for offload in (False, True)}
    tight = (peaks[False] + peaks[True]) // 2  # the activations in RAM do not fit, on disk they do
    planning = PlanChoices(budget=Budget(tight, tight), process_bytes=1, micro_batch=4)
    lm = LayerpressLM(model, work=tmp_path / "work", planning=planning)
    options = lm._planned(readers, tmp_path / "work" / "pass")
    assert options.offload_dir == tmp_path / "work" / "pass" / WORK_DIR / "activations"
    assert_same_scores(stream_and_score(lm.staged, readers, continuations, options),
                       whole_model_scores(model, inputs, continuations))
    refused = PlanChoices(budget=Budget(1000, 1000), process_bytes=1, micro_batch=4)
    with pytest.raises(LayerpressError, match="cannot fit"):
        LayerpressLM(model, planning=refused)._planned(readers, tmp_path / "elsewhere")


def test_lm_evals_own_entry_finds_the_registered_model(tiny_checkpoints, tmp_path):
    """`lm_eval --model layerpress --model_args ...` goes through the registry and create_from_arg_string."""
    model = tiny_checkpoints["opt"]
    assert lm_eval.api.registry.get_model("layerpress") is LayerpressLM
    ours = simple_evaluate(
        model="layerpress", model_args=f"pretrained={model},work={tmp_path / 'work'},max_length={MAX_LENGTH}",
        batch_size=2, device="cpu", tasks=[MULTIPLE_CHOICE], task_manager=task_manager([MULTIPLE_CHOICE], TASKS_DIR),
        log_samples=True,
    )
    assert_same_results(ours, hf_backend(str(model), [MULTIPLE_CHOICE]), [MULTIPLE_CHOICE])


@pytest.mark.slow  # lm-eval's command line indexes its thousands of built-in tasks first (tens of seconds)
def test_the_layerpress_lm_eval_script_runs_lm_evals_command_line(tiny_checkpoints, tmp_path):
    model = tiny_checkpoints["opt"]
    script = "import sys; from streamer.commands.harness import lm_eval_entry_point as run; sys.argv[0] = 'x'; run()"
    done = subprocess.run(
        [sys.executable, "-c", script, "--model", "layerpress", "--model_args",
         f"pretrained={model},work={tmp_path / 'work'},max_length={MAX_LENGTH}", "--tasks", MULTIPLE_CHOICE,
         "--include_path", str(TASKS_DIR), "--batch_size", "2", "--device", "cpu", "--log_samples",
         "--output_path", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (written,) = (tmp_path / "out").rglob("results_*.json")
    theirs = hf_backend(str(model), [MULTIPLE_CHOICE])
    for metric, value in theirs["results"][MULTIPLE_CHOICE].items():
        expected = pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
        assert json.loads(written.read_text())["results"][MULTIPLE_CHOICE][metric] == expected, metric


def run_cli(argv: list[str], failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "LAYERPRESS_FAILPOINT"}
    env.update({"LAYERPRESS_FAILPOINT": failpoint} if failpoint else {})
    return subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True)


def test_killed_evaluation_resumes_to_identical_results(tiny_checkpoints, tmp_path):
    model = tiny_checkpoints["llama"]
    uninterrupted = streamed(model, tmp_path / "uninterrupted.json", [MULTIPLE_CHOICE])
    output = tmp_path / "results.json"
    killed = run_cli(eval_argv(model, output, [MULTIPLE_CHOICE]), failpoint="after-journal:2")
    assert killed.returncode == -9, killed.stderr
    (pass_dir,) = (tmp_path / "results.json.work").iterdir()
    journal = read_journal(pass_dir)
    assert journal["state"] == "running" and journal["blocks_done"] == 2 and not output.exists()
    result = streamed(model, output, [MULTIPLE_CHOICE])  # the same command, resumed in this process
    assert main.main(["status", str(pass_dir)]) == 0
    assert result["results"] == uninterrupted["results"] and result["samples"] == uninterrupted["samples"]


def test_a_generation_task_is_refused_in_one_line(tiny_checkpoints, tmp_path, capsys):
    argv = eval_argv(tiny_checkpoints["llama"], tmp_path / "results.json", [MULTIPLE_CHOICE, "layerpress_cloze_gen"])
    assert main.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "layerpress_cloze_gen" in error and "generate_until" in error
    assert not (tmp_path / "results.json.work").exists()  # refused before any pass started


def compress(model: Path, out: Path, calib: Path, *method: str) -> Path:
    assert main.main(["-q", "compress", "--model", str(model), "--out", str(out), "--calib", str(calib),
                      "--nsamples", "4", "--seqlen", "32", "--device", "cpu", *method]) == 0
    return out


@pytest.mark.parametrize("kind", ["sparse", "packed", "flap"])
def test_compressed_outputs_equal_the_hf_backend_on_their_dense_model(tiny_checkpoints, tmp_path, calib_text, kind):
    model = tiny_checkpoints["llama"]
    methods = {"sparse": ["--method", "sparsegpt", "--sparsity", "0.5", "--format", "sparse"],
               "packed": ["--method", "gptq", "--wbits", "4", "--format", "packed"],
               "flap": ["--method", "flap", "--ratio", "0.2"]}
    out = compress(model, tmp_path / kind, calib_text, *methods[kind])
    ours = streamed(out, tmp_path / "results.json", [MULTIPLE_CHOICE], "--max-length", str(MAX_LENGTH))
    if kind == "flap":  # per-block shapes: the HF backend gets the model object, as transformers cannot load it
        theirs = hf_backend(load_model(out), [MULTIPLE_CHOICE], tokenizer=load_tokenizer(out))
    else:
        assert main.main(["-q", "decompress", "--model", str(out), "--out", str(tmp_path / "dense")]) == 0
        theirs = hf_backend(str(tmp_path / "dense"), [MULTIPLE_CHOICE])
    assert_same_results(ours, theirs, [MULTIPLE_CHOICE])
    assert ours["layerpress"]["record"]["method"] and ours["layerpress"]["compression"] is not None


@pytest.mark.slow
def test_smollm2_multiple_choice_equals_the_hf_backend(smollm2, tmp_path):
    ours = streamed(smollm2, tmp_path / "results.json", [MULTIPLE_CHOICE], "--micro-batch", "16")
    theirs = hf_backend(str(smollm2), [MULTIPLE_CHOICE], max_length=None)
    assert_same_results(ours, theirs, [MULTIPLE_CHOICE])
    assert ours["results"][MULTIPLE_CHOICE]["acc,none"] > 0.5, "SmolLM2 should get simple cloze sentences right"


def test_two_ranks_score_their_shares_and_report_what_one_process_does(tiny_checkpoints, tmp_path):
    """Under torchrun each rank streams half of the distinct inputs; rank 0 alone writes and prints the results."""
    from tests.test_distributed import torchrun

    model = tiny_checkpoints["llama"]
    one = streamed(model, tmp_path / "one.json", TASKS, "--max-length", str(MAX_LENGTH))
    result = torchrun(eval_argv(model, tmp_path / "two.json", TASKS, "--max-length", str(MAX_LENGTH))[1:],
                      DISABLE_MULTIPROC="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(MULTIPLE_CHOICE) == 1, "one rank prints the table"
    two = json.loads((tmp_path / "two.json").read_text())
    assert_same_results(two, one, TASKS)
    journals = (tmp_path / "two.json.work").glob("*/.layerpress/journal.json")
    passes = [json.loads(path.read_text())["body"] for path in journals]
    assert passes and all(body["settings"]["world_size"] == 2 and body["state"] == "complete" for body in passes)
