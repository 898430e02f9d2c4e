"""The score pass: loss estimates that rank like the measured error, resumable, and compress fed by them."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import main
import streamer.commands.scores
from methods.allocation import weighted_mean
from methods.hessian import inverse_cholesky
from methods.masks import lowest_in_rows, lowest_overall
from methods.scores import one_shot_saliency, outlier_counts, score_layer
from methods.statistics import Gram
from tests.test_compress import NSAMPLES, SEQLEN, run_compress


def random_layer(rows: int = 24, columns: int = 48, tokens: int = 768, seed: int = 0):
    """A linear layer and correlated inputs of uneven scale, as real activations are."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    mixing += torch.diag(torch.rand(columns, generator=generator) * 2)
    inputs = torch.randn(tokens, columns, generator=generator) @ mixing
    layer = nn.Linear(columns, rows, bias=False)
    layer.weight.data = torch.randn(rows, columns, generator=generator)
    gram = Gram(layer)
    gram.update(inputs)
    return layer, gram, inputs


def reconstruction_error(weight: torch.Tensor, new: torch.Tensor, inputs: torch.Tensor) -> float:
    """‖WX − ŴX‖² / N, measured."""
    return float(((weight - new) @ inputs.T).pow(2).sum() / inputs.shape[0])


def best_reconstruction(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The kept weights of each row that minimize the reconstruction error once the masked ones are zero."""
    new = torch.zeros_like(weight)
    for row in range(weight.shape[0]):
        keep, drop = ~mask[row], mask[row]
        correction = torch.linalg.solve(hessian[keep][:, keep], hessian[keep][:, drop] @ weight[row, drop])
        new[row, keep] = weight[row, keep] + correction
    return new


def ranks(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).argsort().argsort().float()


def spearman(a: list[float], b: list[float]) -> float:
    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


def test_obs_loss_is_the_measured_reconstruction_error_of_the_sweep():
    layer, gram, inputs = random_layer()
    estimated, measured = [], []
    for sparsity in (0.2, 0.4, 0.6, 0.8):
        for blocksize in (8, 128):  # different blocksizes choose different masks
            score = score_layer(layer, gram, (sparsity,), damping=1e-6, blocksize=blocksize, keep_pruned=True)
            estimated.append(score.obs_loss[sparsity])
            measured.append(reconstruction_error(layer.weight.detach(), score.pruned, inputs))
    assert estimated == pytest.approx(measured, rel=1e-3)
    weight = layer.weight.detach()
    assert score.output_energy == pytest.approx(reconstruction_error(weight, torch.zeros_like(weight), inputs),
                                                rel=1e-5)
    # with the default damping the estimate is of the damped Hessian: close, and ranked the same
    estimated, measured = [], []
    for sparsity in (0.2, 0.4, 0.6, 0.8):
        score = score_layer(layer, gram, (sparsity,), damping=0.01, blocksize=16, keep_pruned=True)
        estimated.append(score.obs_loss[sparsity])
        measured.append(reconstruction_error(layer.weight.detach(), score.pruned, inputs))
    assert estimated == pytest.approx(measured, rel=0.1)
    assert spearman(estimated, measured) == 1.0


def test_one_shot_saliency_ranks_masks_like_the_measured_error():
    layer, gram, inputs = random_layer()
    weight = layer.weight.detach()
    factor, _ = inverse_cholesky(gram.gram, 0.01, gram.scale)
    saliency = weight.pow(2) / factor.diagonal().pow(2)
    count = weight.numel() // 2
    masks = {
        "saliency": lowest_overall(saliency, count),
        "saliency per row": lowest_in_rows(saliency, weight.shape[1] // 2),
        "magnitude": lowest_overall(weight.abs(), count),
        "most salient": lowest_overall(-saliency, count),
        **{f"random {seed}": lowest_overall(torch.rand(weight.shape, generator=torch.Generator().manual_seed(seed)),
                                            count) for seed in range(6)},
    }
    estimated = {name: one_shot_saliency(weight, factor, mask) for name, mask in masks.items()}
    measured = {name: reconstruction_error(weight, best_reconstruction(weight, gram.hessian, mask), inputs)
                for name, mask in masks.items()}
    assert spearman(list(estimated.values()), list(measured.values())) > 0.8
    assert max(measured, key=measured.get) == max(estimated, key=estimated.get) == "most salient"
    assert measured["saliency"] < min(measured[f"random {seed}"] for seed in range(6))


def test_outliers_are_counted_against_the_mean_of_the_whole_block():
    scores = {"a": torch.tensor([[1.0, 1.0, 1.0, 9.0]]), "b": torch.tensor([[1.0, 1.0, 1.0, 1.0]])}
    # the block mean is 16 / 8 = 2: only 9 exceeds 2 * 2 = 4; against b's own mean (1), none of b's would either
    assert outlier_counts(scores.__getitem__, scores, threshold=2.0) == {"a": 1, "b": 0}
    assert outlier_counts(scores.__getitem__, scores, threshold=5.0) == {"a": 0, "b": 0}


def run_scores(model, out, calib, *extra: str) -> dict:
    argv = ["scores", "--model", str(model), "--out", str(out), "--calib", str(calib),
            "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu", *extra]
    assert main.main(argv) == 0
    return json.loads((out / "scores.json").read_text())


def test_score_pass_resumes_after_a_kill_with_identical_scores(tiny_checkpoints, tmp_path, calib_text, monkeypatch):
    model = tiny_checkpoints["llama"]
    expected = run_scores(model, tmp_path / "whole", calib_text, "--sparsity", "0.6", "0.7")

    calls = []
    score_block = streamer.commands.scores.score_block

    def dies_in_the_second_block(context, *args, **kwargs):
        calls.append(context.index)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would, after block 0 is durable
        return score_block(context, *args, **kwargs)

    monkeypatch.setattr(streamer.commands.scores, "score_block", dies_in_the_second_block)
    argv = ["scores", "--model", str(model), "--out", str(tmp_path / "killed"), "--calib", str(calib_text),
            "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu", "--sparsity", "0.6", "0.7"]
    assert main.main(argv) == 130
    assert not (tmp_path / "killed" / "scores.json").exists()
    monkeypatch.setattr(streamer.commands.scores, "score_block", score_block)
    resumed = run_scores(model, tmp_path / "killed", calib_text, "--sparsity", "0.6", "0.7")
    assert calls == [0, 1]
    assert resumed == expected
    layers = resumed["layers"]
    assert len(layers) == 3 * 7 and all(set(r["obs_loss"]) == {"0.6", "0.7"} for r in layers.values())
    assert all(r["obs_loss"]["0.7"] > r["obs_loss"]["0.6"] > 0 for r in layers.values())


def test_pruned_inputs_change_only_the_blocks_after_the_first(tiny_checkpoints, tmp_path, calib_text):
    model = tiny_checkpoints["opt"]
    dense = run_scores(model, tmp_path / "dense", calib_text, "--sparsity", "0.7")["layers"]
    pruned = run_scores(model, tmp_path / "pruned", calib_text, "--sparsity", "0.7", "--inputs", "pruned")["layers"]
    for name, record in dense.items():
        if record["block"] == 0:  # its inputs are the dense model's; CMPQ compares them with its (pruned) output
            assert {**pruned[name], "cmpq": None} == {**record, "cmpq": None}, name
            assert pruned[name]["cmpq"] != record["cmpq"], name
        else:
            assert pruned[name]["obs_loss"] != record["obs_loss"], name


@pytest.fixture(scope="module")
def llama_scores(tiny_checkpoints, tmp_path_factory):
    from tests.conftest import DEFAULT_CALIBRATION

    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    out = tmp_path_factory.mktemp("scores") / "scores"
    run_scores(tiny_checkpoints["llama"], out, calib, "--sparsity", "0.7")
    return out, calib


@pytest.mark.parametrize("method, allocation", [("sparsegpt", "score"), ("wanda", "owl"), ("magnitude", "depth")])
def test_compress_prunes_each_layer_to_its_allocated_sparsity(tiny_checkpoints, tmp_path, llama_scores, method,
                                                            allocation):
    scores, calib = llama_scores
    out = tmp_path / "out"
    run_compress(tiny_checkpoints["llama"], out, calib, "--method", method, "--sparsity", "0.7",
                 "--allocation", allocation, "--scores", str(scores))
    record = json.loads((out / "config.json").read_text())["layerpress"]
    assert record["allocation"]["kind"] == allocation
    assert (record["allocation"]["min_sparsity"], record["allocation"]["max_sparsity"]) == (0.6, 0.8)
    targets, achieved = record["layer_targets"], record["layer_sparsity"]
    assert targets.keys() == achieved.keys() and len(targets) == 3 * 7
    assert max(targets.values()) - min(targets.values()) > 0.05
    for name, target in targets.items():
        assert achieved[name] == pytest.approx(target, abs=1 / 64), name  # whole weights per row of 64 or more
    layers = json.loads((scores / "scores.json").read_text())["layers"]
    params = [layers[name]["params"] for name in targets]
    assert weighted_mean(list(targets.values()), params) == pytest.approx(0.7, abs=1e-12)


def test_uniform_keeps_the_record_of_older_runs(tiny_checkpoints, tmp_path, calib_text):
    out = tmp_path / "out"
    run_compress(tiny_checkpoints["llama"], out, calib_text, "--method", "magnitude", "--sparsity", "0.7")
    record = json.loads((out / "config.json").read_text())["layerpress"]
    assert "allocation" not in record and "layer_targets" not in record


def test_resume_refuses_another_allocation(tiny_checkpoints, tmp_path, llama_scores, capsys):
    scores, calib = llama_scores
    out = tmp_path / "out"
    run_compress(tiny_checkpoints["llama"], out, calib, "--method", "magnitude", "--sparsity", "0.7",
                 "--allocation", "depth")
    argv = ["compress", "--model", str(tiny_checkpoints["llama"]), "--out", str(out), "--calib", str(calib),
            "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu", "--method", "magnitude",
            "--sparsity", "0.7", "--allocation", "score", "--scores", str(scores)]
    assert main.main(argv) == 1
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--allocation", "score"], "needs --scores"),
    (["--allocation", "depth", "--min-sparsity", "0.75"], "bounds"),
    (["--allocation", "depth", "--pattern", "2:4"], "N:M"),
    (["--allocation", "owl", "--scores", "nowhere"], "holds no scores.json"),
])
def test_bad_allocation_settings_are_one_line_errors(tiny_checkpoints, tmp_path, calib_text, capsys, extra, message):
    argv = ["compress", "--model", str(tiny_checkpoints["llama"]), "--out", str(tmp_path / "out"), "--calib",
            str(calib_text), "--device", "cpu", *extra]
    if "--pattern" not in extra:
        argv += ["--sparsity", "0.7"]
    assert main.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("layerpress: error:") and message in err and err.count("\n") == 1


def test_scores_of_another_model_are_refused(tiny_checkpoints, tmp_path, calib_text, capsys):
    scores = tmp_path / "scores"
    run_scores(tiny_checkpoints["opt"], scores, calib_text, "--sparsity", "0.7")
    argv = ["compress", "--model", str(tiny_checkpoints["llama"]), "--out", str(tmp_path / "out"), "--calib",
            str(calib_text), "--device", "cpu", "--sparsity", "0.7", "--allocation", "score", "--scores", str(scores)]
    assert main.main(argv) == 1
    assert "do not cover this model" in capsys.readouterr().err


def test_scores_observed_one_layer_at_a_time_equal_a_whole_blocks(tiny_checkpoints, tmp_path, calib_text):
    """--statistics-per-layer holds one Gram instead of the block's; pruned inputs still come after every layer."""
    model = tiny_checkpoints["opt"]
    together = run_scores(model, tmp_path / "together", calib_text, "--inputs", "pruned")
    alone = run_scores(model, tmp_path / "alone", calib_text, "--inputs", "pruned", "--statistics-per-layer")
    assert alone["layers"] == together["layers"]
