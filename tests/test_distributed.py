"""torchrun: two CPU processes (gloo) compress, score and evaluate like one, and a killed job resumes to the same bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import main
from streamer.distributed import World
from streamer.journal import JOURNAL_FILE, WORK_DIR
from tests.conftest import ROOT
from tests.distributed_shares import combine_shares
from tests.test_resume import output_digest

NSAMPLES, SEQLEN = 4, 32
METHODS = {  # family, method options: one of each kind of statistic (Gram, column norms, with gradient norms)
    "sparsegpt": ("llama", ["--method", "sparsegpt"]),
    "wanda": ("opt", ["--method", "wanda"]),
    "gptq": ("bloom", ["--method", "gptq", "--wbits", "4", "--groupsize", "32"]),
    "gblm": ("llama", ["--method", "gblm", "--alpha", "100"]),
    # each step one micro-batch of all 4 windows in one process, of 2 per rank in two: the same averaged gradient
    "reconstruction": ("opt", ["--method", "wanda", "--reconstruct", "biases,norms,masklora", "--recon-steps", "4",
                               "--micro-batch", "4"]),
    # structured: pooled channel moments decide which heads and channels stay; rank 0 alone cuts and writes
    "flap": ("opt", ["--method", "flap", "--ratio", "0.25"]),
}


def calibrated(model: Path, calib: Path) -> list[str]:
    return ["--model", str(model), "--calib", str(calib), "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN),
            "--device", "cpu"]


def torchrun(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 main.py ARGV` on this machine (one thread per rank)."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("LAYERPRESS_FAILPOINT")}
    environment.update(OMP_NUM_THREADS="1", LAYERPRESS_COLLECTIVE_TIMEOUT="120", **env)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "main.py", "-q",
         *argv],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )


def tensors(out: Path) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        loaded.update(load_file(shard))
    return loaded


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text((ROOT / "data" / "wikitext2-valid.tokens").read_text(encoding="utf-8")[:50_000])
    return path


@pytest.fixture(scope="module")
def gradients(tiny_checkpoints, calib, tmp_path_factory) -> Path:
    """Gradient norms of tiny Llama (one process: gblm's input, the same for both worlds)."""
    out = tmp_path_factory.mktemp("gradients") / "grad"
    assert main.main(["-q", "gradients", "--out", str(out), *calibrated(tiny_checkpoints["llama"], calib)]) == 0
    return out


@pytest.fixture(scope="module")
def worlds(tiny_checkpoints, calib, request, tmp_path_factory):
    """compress argv and outputs of world 1 (in this process) and world 2 (torchrun), per method, made on demand."""
    made: dict[str, tuple[list[str], Path, Path]] = {}

    def outputs(method: str) -> tuple[list[str], Path, Path]:
        if method not in made:
            family, options = METHODS[method]
            tmp = tmp_path_factory.mktemp(method)
            extra = ["--gradients", str(request.getfixturevalue("gradients"))] if method == "gblm" else []
            argv = ["compress", *calibrated(tiny_checkpoints[family], calib), "--max-shard-size", "30KB", *options,
                    *extra]
            assert main.main(["-q", *argv, "--out", str(tmp / "one")]) == 0
            result = torchrun([*argv, "--out", str(tmp / "two")])
            assert result.returncode == 0, result.stderr
            made[method] = argv, tmp / "one", tmp / "two"
        return made[method]

    return outputs


def assert_same_model(one: Path, two: Path, method: str) -> None:
    """Outputs of world 1 and world 2: the same tensors and shapes (for flap: the same heads and channels kept),
    the same zeros, values equal up to summation order."""
    single, double = tensors(one), tensors(two)
    assert single.keys() == double.keys()
    for name, weight in single.items():
        other = double[name]
        assert weight.shape == other.shape, f"{name}: {tuple(weight.shape)} against {tuple(other.shape)}"
        assert torch.equal(weight == 0, other == 0) or method == "gptq", f"{name}: masks differ"
        difference = (weight.float() - other.float()).abs().max().item()
        # float32 sums in another order; gptq may round a weight to the neighbouring grid point; training steps
        # move the sums' rounding differences further
        tolerance = {"gptq": 2e-2, "reconstruction": 1e-3}.get(method, 1e-4)
        assert difference <= tolerance * max(weight.float().abs().max().item(), 1.0), f"{name}: {difference}"


@pytest.mark.parametrize("method", [method if method == "sparsegpt" else pytest.param(method, marks=pytest.mark.slow)
                                    for method in METHODS])
def test_world_of_two_compresses_as_world_of_one(worlds, method):
    _, one, two = worlds(method)
    assert_same_model(one, two, method)
    record = json.loads((two / "config.json").read_text())["layerpress"]
    assert record["method"] == METHODS[method][1][1]
    assert method != "reconstruction" or record["reconstruction_summary"]["trained_parameters"] > 0
    journal = json.loads((two / WORK_DIR / JOURNAL_FILE).read_text())["body"]
    assert journal["settings"]["world_size"] == 2 and journal["state"] == "complete"


def test_killed_rank_resumes_to_identical_bytes_with_its_world_size_only(worlds, tiny_checkpoints, tmp_path):
    argv, one, two = worlds("sparsegpt")
    out = tmp_path / "out"
    argv = [*argv, "--out", str(out)]
    killed = torchrun(argv, LAYERPRESS_FAILPOINT="before-propagate:2", LAYERPRESS_FAILPOINT_RANK="1")
    assert killed.returncode != 0
    assert not (out / "model.safetensors.index.json").exists(), "a killed job must not look complete"

    journal = json.loads((out / WORK_DIR / JOURNAL_FILE).read_text())["body"]
    assert journal["blocks_done"] == 1
    hidden = json.loads((tiny_checkpoints["llama"] / "config.json").read_text())["hidden_size"]
    single_buffer = NSAMPLES * SEQLEN * hidden * 4  # float32: what one process persists
    sizes = [Path(path).stat().st_size for path in journal["rank_inputs"]]
    assert sizes == [single_buffer // 2] * 2, "each rank keeps half of the windows"

    assert main.main(["-q", *argv]) == 1  # world 1 on a world-2 partial run: refused
    assert not (out / "model.safetensors.index.json").exists()

    resumed = torchrun(argv)
    assert resumed.returncode == 0, resumed.stderr
    assert output_digest(out) == output_digest(two), "resumed bytes differ from an uninterrupted world-2 run"
    assert not list((out / WORK_DIR).glob("inputs-*")), "persisted activations are removed when the run completes"


def test_flap_killed_in_its_statistics_pass_resumes_to_the_model_of_one_process(tiny_checkpoints, calib, tmp_path):
    """Each rank observes half the windows; the pooled moments make rank 0 keep the units one process keeps."""
    family, options = METHODS["flap"]
    argv = ["compress", *calibrated(tiny_checkpoints[family], calib), "--max-shard-size", "30KB", *options]
    assert main.main(["-q", *argv, "--out", str(tmp_path / "one")]) == 0
    out = tmp_path / "two"
    killed = torchrun([*argv, "--out", str(out)], LAYERPRESS_FAILPOINT="before-propagate:2",
                      LAYERPRESS_FAILPOINT_RANK="1")
    assert killed.returncode != 0
    statistics = json.loads((out / WORK_DIR / "statistics" / WORK_DIR / JOURNAL_FILE).read_text())["body"]
    assert statistics["blocks_done"] == 1 and len(statistics["rank_inputs"]) == 2
    assert not (out / "model.safetensors.index.json").exists()
    resumed = torchrun([*argv, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_model(tmp_path / "one", out, "flap")
    kept = [json.loads((path / "config.json").read_text())["layerpress"]["kept_units"]
            for path in (tmp_path / "one", out)]
    assert kept[0] == kept[1]


def test_gradients_of_two_ranks_equal_one_and_resume_after_a_kill_in_the_backward_walk(gradients, tiny_checkpoints,
                                                                                        calib, tmp_path):
    """Each rank's windows' squared gradients add up to one process's; killed after block 3's norms are written but
    before they are journaled (every rank has then computed block 3's input gradient), the job redoes block 3 from
    the gradient slot no rank has overwritten."""
    argv = ["gradients", *calibrated(tiny_checkpoints["llama"], calib)]
    whole = torchrun([*argv, "--out", str(tmp_path / "two")])
    assert whole.returncode == 0, whole.stderr
    single, double = tensors(gradients), tensors(tmp_path / "two")
    assert single.keys() == double.keys()
    for name, norms in single.items():
        torch.testing.assert_close(double[name], norms, rtol=1e-4, atol=1e-7 * norms.abs().max().item())
    loss = [json.loads((out / WORK_DIR / JOURNAL_FILE).read_text())["body"]["loss"]
            for out in (gradients, tmp_path / "two")]
    assert loss[1] == pytest.approx(loss[0], rel=1e-6)

    killed_out = tmp_path / "killed"
    # journal records: 3 forward blocks, the head, then the backward walk's blocks 3, 2, 1
    killed = torchrun([*argv, "--out", str(killed_out)], LAYERPRESS_FAILPOINT="before-journal:5",
                      LAYERPRESS_FAILPOINT_RANK="0")
    assert killed.returncode != 0
    assert json.loads((killed_out / WORK_DIR / JOURNAL_FILE).read_text())["body"]["backward"]["blocks_done"] == 0
    resumed = torchrun([*argv, "--out", str(killed_out)])
    assert resumed.returncode == 0, resumed.stderr
    assert output_digest(killed_out) == output_digest(tmp_path / "two")
    assert not list((killed_out / WORK_DIR).rglob("*.bin")), "activation and gradient files are removed at the end"


@pytest.mark.slow
def test_killed_writer_resumes_to_identical_bytes(worlds, tmp_path):
    argv, _, two = worlds("sparsegpt")
    argv = [*argv, "--out", str(tmp_path / "out")]
    for point in ("shard-write:3", "after-journal:2"):  # inside a shard write; between a journal and the next block
        killed = torchrun(argv, LAYERPRESS_FAILPOINT=point, LAYERPRESS_FAILPOINT_RANK="0")
        assert killed.returncode != 0, point
    resumed = torchrun(argv)
    assert resumed.returncode == 0, resumed.stderr
    assert output_digest(tmp_path / "out") == output_digest(two)


def test_other_world_size_is_refused_in_one_line(worlds, tmp_path, capsys):
    argv, _, _ = worlds("sparsegpt")
    out = tmp_path / "out"
    (out / WORK_DIR).mkdir(parents=True)
    body = {"format": 1, "command": "compress", "state": "running", "settings": {"world_size": 2},
            "fingerprints": {}, "blocks_done": 1}
    from streamer.journal import _checksum

    (out / WORK_DIR / JOURNAL_FILE).write_text(json.dumps({"body": body, "checksum": _checksum(body)}))
    assert main.main(["-q", *argv, "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert "started by 2 process(es)" in error and "resume it with world size 2, not 1" in error
    assert "\n" not in error


@pytest.mark.slow
def test_eval_and_scores_of_two_ranks_match_one(worlds, tiny_checkpoints, calib, tmp_path, capsys):
    _, one, _ = worlds("sparsegpt")
    evaluation = ["eval", "--model", str(one), "--windows", str(NSAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu"]
    assert main.main(["-q", *evaluation]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = torchrun(evaluation)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, "one rank prints the result"
    double = json.loads(lines[0])
    assert double["windows"] == single["windows"] and double["ppl"] == pytest.approx(single["ppl"], rel=1e-5)

    scores = ["scores", *calibrated(tiny_checkpoints["llama"], calib), "--sparsity", "0.5"]
    assert main.main(["-q", *scores, "--out", str(tmp_path / "one")]) == 0
    result = torchrun([*scores, "--out", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr
    single, double = (json.loads((tmp_path / name / "scores.json").read_text())["layers"] for name in ("one", "two"))
    assert single.keys() == double.keys()
    for name, record in single.items():
        assert double[name]["obs_loss"]["0.5"] == pytest.approx(record["obs_loss"]["0.5"], rel=1e-3), name


@pytest.mark.parametrize("rank", ["0", "1"])
def test_unsupported_commands_are_refused_under_torchrun_by_rank_0(tiny_checkpoints, calib, tmp_path, monkeypatch,
                                                                   capsys, rank):
    """Refused before any rank joins the job (so the environment torchrun sets is enough to test it)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    argv = ["-q", "decompress", "--model", str(tiny_checkpoints["llama"]), "--out", str(tmp_path / "out")]
    assert main.main(argv) == 1
    expected = ("layerpress: error: rank 0 of 2: decompress does not run under torchrun (2 processes): run it as one "
                "process; compress, scores, gradients and eval (perplexity) run data-parallel")
    assert capsys.readouterr().err.strip() == (expected if rank == "0" else "")


def test_eval_tasks_without_a_shared_work_directory_is_refused_under_torchrun(tiny_checkpoints, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main.main(["-q", "eval", "--model", str(tiny_checkpoints["llama"]), "--tasks", "piqa"]) == 1
    assert capsys.readouterr().err.strip() == (
        "layerpress: error: rank 0 of 2: eval --tasks under torchrun needs --work DIR (or --output FILE) on a "
        "filesystem every rank sees: the ranks share its passes' journals")


def test_windows_are_shared_in_contiguous_balanced_slices():
    shares = [World(rank, 3).share(8) for rank in range(3)]
    assert shares == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert World().share(8) == slice(0, 8)
    owners = World(1, 2).assign({"a": 5.0, "b": 3.0, "c": 2.0, "d": 1.0})
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0}


def test_plan_of_one_rank_holds_its_share_of_the_activations_and_solves(tiny_checkpoints):
    from streamer.commands.plan import PlanSettings, plan
    from streamer.planner import Budget, Workload

    def planned(world_size: int):
        workload = Workload(main.METHODS["sparsegpt"](), main.Target(sparsity=0.5), 8, SEQLEN, world_size=world_size)
        return plan(PlanSettings(tiny_checkpoints["llama"], workload, SEQLEN, torch.device("cpu"),
                                 Budget(device=0, host=2**34), speed=ROOT / "tools/speeds/a100-80gb-assumed.json"))

    single, double = planned(1), planned(2)
    assert double.planner.activation_buffer_bytes() * 2 == single.planner.activation_buffer_bytes()
    assert single.estimate.exchange == 0 < double.estimate.exchange
    assert double.estimate.compute < single.estimate.compute
    assert "4 windows per rank of 2" in double.describe()


def test_fewer_windows_than_ranks_are_refused_before_any_rank_joins(tiny_checkpoints, calib, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = ["-q", "compress", "--out", str(tmp_path / "out"), *calibrated(tiny_checkpoints["llama"], calib),
            "--nsamples", "1"]
    assert main.main(argv) == 1
    assert capsys.readouterr().err.strip() == ("layerpress: error: rank 0 of 2: 1 windows cannot be shared by 2 "
                                               "ranks: every rank needs at least one")


def test_statistics_combined_across_ranks_equal_one_accumulator_over_all_windows(tmp_path):
    from methods.statistics import ColumnNorms, Gram, Moments

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(10, 4, 6, generator=generator) * 3 + 100  # |mean| >> std: the naive variance would fail
    torch.multiprocessing.spawn(combine_shares, args=(f"file://{tmp_path / 'store'}", inputs, str(tmp_path / "r")),
                                nprocs=2)
    layer = torch.nn.Linear(6, 3)
    gram, norms, moments = Gram(layer), ColumnNorms(layer), Moments(layer)
    for statistic in (gram, norms, moments):
        for batch in inputs.split(3):
            statistic.update(batch)
    for rank in (0, 1):
        combined = torch.load(tmp_path / f"r.{rank}")
        torch.testing.assert_close(combined["hessian"], gram.hessian, rtol=1e-6, atol=1e-3)
        torch.testing.assert_close(combined["norms"], norms.norms)
        torch.testing.assert_close(combined["mean"], moments.mean)
        torch.testing.assert_close(combined["variance"], moments.variance)
