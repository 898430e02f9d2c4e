"""CPTQuant: sensitivities that mean what the README says, bits within the budget, streamed = in memory, resumable,
packed mixed-precision outputs that transformers loads, and bad options refused in one line."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import main
from methods import METHODS, QuantSpec, Target
from methods.allocation import bits_by_sensitivity, weighted_mean
from methods.sensitivity import BlockCorrelation, canonical_sensitivity, pruning_sensitivity, taylor_sensitivity
from streamer.data import DEFAULT_CALIBRATION, calibration_windows, load_text, load_tokenizer, tokenize
from streamer.adapters import adapter_for
from tests.reference import compress_in_memory, first_block_inputs, in_memory_model, recorded_micro_batch
from tests.test_compress import NSAMPLES, SEQLEN, run_compress
from tests.test_quant import interrupted_at_block, shard_bytes
from tests.test_resume import output_digest
from tests.test_scores import random_layer, run_scores

POLICY = ["--method", "gptq", "--groupsize", "32", "--avg-bits", "5", "--bit-choices", "4,8"]


def test_bits_hit_the_budget_exactly_when_they_can_and_go_to_the_most_sensitive_layers():
    sensitivity = [0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.4, 0.6]
    bits = bits_by_sensitivity(sensitivity, [100] * 8, (4, 8), 5.0)
    assert weighted_mean(bits, [100] * 8) == 5.0
    assert [i for i, b in enumerate(bits) if b == 8] == [1, 4]  # the two most sensitive


@pytest.mark.parametrize("choices", [(4, 8), (3, 4, 8), (2, 5, 6)])
def test_bits_stay_within_the_budget_and_no_layer_could_still_go_up(choices):
    rng = random.Random(sum(choices))
    for _ in range(20):
        params = [rng.choice([64, 128, 4096, 9000]) for _ in range(12)]
        sensitivity = [rng.random() for _ in params]
        average = rng.uniform(min(choices), max(choices))
        bits = bits_by_sensitivity(sensitivity, params, choices, average)
        assert set(bits) <= set(choices)
        mean = weighted_mean(bits, params)
        assert mean <= average + 1e-12
        left = (average - mean) * sum(params)
        for b, n in zip(bits, params):  # first fit: whatever is left is too small for any further step
            assert all((higher - b) * n > left for higher in choices if higher > b)
        assert bits[max(range(12), key=sensitivity.__getitem__)] >= max(
            b for b in choices if (b - min(choices)) * params[max(range(12), key=sensitivity.__getitem__)]
            <= (average - min(choices)) * sum(params) + 1e-9)


@pytest.mark.parametrize("rows,columns", [(24, 48), (48, 24)])
def test_cmpq_noise_is_one_minus_the_mean_canonical_correlation_of_input_and_noisy_output(rows, columns):
    layer, gram, inputs = random_layer(rows, columns)
    weight = layer.weight.detach().double()
    moments = gram.hessian.double() / 2  # E[x xᵀ]
    noise = 0.05
    level = noise * float(torch.trace(weight @ moments @ weight.T)) / rows
    cross = moments @ weight.T  # E[x (Wx + e)ᵀ]
    output = weight @ moments @ weight.T + level * torch.eye(rows, dtype=torch.float64)

    def inverse_root(matrix):
        values, vectors = torch.linalg.eigh(matrix)
        return (vectors / values.sqrt()) @ vectors.T

    correlations = torch.linalg.svdvals(inverse_root(moments) @ cross @ inverse_root(output))
    assert correlations.numel() == min(rows, columns)
    expected = 1 - float(correlations.mean())
    assert canonical_sensitivity(layer.weight.detach(), gram.hessian, noise) == pytest.approx(expected, rel=1e-6)
    assert canonical_sensitivity(layer.weight.detach(), gram.hessian, 10 * noise) > expected  # more noise: lower


def textbook_canonical_correlations(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CCA written out: center, Cxx^-½ Cxy Cyy^-½ from whole-matrix covariances, its singular values."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)

    def inverse_root(matrix):
        values, vectors = torch.linalg.eigh(matrix)
        return (vectors / values.sqrt()) @ vectors.T

    n = x.shape[0]
    return torch.linalg.svdvals(inverse_root(x.T @ x / n) @ (x.T @ y / n) @ inverse_root(y.T @ y / n))


def test_block_cmpq_is_one_minus_the_mean_canonical_correlation_of_a_blocks_input_and_output():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 12, generator=generator) * torch.linspace(0.5, 3, 12) + 2
    mixed = x + 0.5 * torch.tanh(x @ torch.randn(12, 12, generator=generator))  # a residual block's shape
    correlation = BlockCorrelation(12, torch.device("cpu"))
    for xs, ys in zip(x.split(700), mixed.split(700)):  # uneven chunks, float32 as activations come
        correlation.update(xs.view(1, -1, 12), ys.view(1, -1, 12))
    expected = textbook_canonical_correlations(x, mixed)
    torch.testing.assert_close(correlation.correlations(), expected, rtol=1e-8, atol=1e-10)
    assert correlation.sensitivity() == pytest.approx(1 - float(expected.mean()), rel=1e-8)

    linear = BlockCorrelation(12, torch.device("cpu"))  # a linear block keeps every direction: correlations 1
    linear.update(x, x @ torch.randn(12, 12, generator=generator) + 1)
    assert linear.sensitivity() == pytest.approx(0.0, abs=1e-9)
    unrelated = BlockCorrelation(12, torch.device("cpu"))
    unrelated.update(x, torch.randn(3000, 12, generator=generator))
    assert unrelated.sensitivity() > 0.9


def test_the_score_pass_gives_each_layer_its_blocks_cmpq(tiny_checkpoints, llama_scores):
    document, _, calib = llama_scores
    model = tiny_checkpoints["llama"]
    oracle = in_memory_model(model)
    windows = calibration_windows(tokenize(load_tokenizer(model), load_text(calib)), NSAMPLES, SEQLEN, 0)
    hidden, forward = first_block_inputs(oracle, windows)
    blocks = oracle.get_submodule(adapter_for(oracle.config.to_dict()).blocks)
    for index, block in enumerate(blocks):
        with torch.no_grad():
            outputs = [forward(block, h) for h in hidden]
        flat = lambda tensors: torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors])  # noqa: E731
        expected = 1 - float(textbook_canonical_correlations(flat(hidden), flat(outputs)).mean())
        values = {layer["cmpq"] for layer in document["layers"].values() if layer["block"] == index}
        assert len(values) == 1 and values.pop() == pytest.approx(expected, rel=1e-6)
        hidden = outputs


def test_pmpq_and_tdmpq_are_the_measured_relative_output_errors():
    layer, gram, inputs = random_layer()
    weight = layer.weight.detach()
    output = (inputs @ weight.T).pow(2).sum()
    pruned = weight.clone()
    pruned[weight.abs() <= weight.abs().flatten().kthvalue(int(0.3 * weight.numel())).values] = 0
    measured = float(((inputs @ (weight - pruned).T).pow(2).sum() / output))
    assert pruning_sensitivity(weight, gram.hessian, 0.3) == pytest.approx(measured, rel=1e-4)
    generator = torch.Generator().manual_seed(1)
    scale = inputs.pow(2).mean(dim=0).sqrt()
    draws = [float((torch.randn(inputs.shape, generator=generator) * scale @ weight.T).pow(2).sum() / output)
             for _ in range(200)]
    assert taylor_sensitivity(weight, gram.hessian) == pytest.approx(sum(draws) / len(draws), rel=0.02)


@pytest.fixture(scope="module")
def llama_scores(tiny_checkpoints, tmp_path_factory):
    work = tmp_path_factory.mktemp("cptq")
    calib = work / "calib.txt"
    calib.write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    return run_scores(tiny_checkpoints["llama"], work / "scores", calib), work / "scores", calib


@pytest.mark.parametrize("policy", ["cmpq", "cmpq-noise", "pmpq", "tdmpq"])
def test_policy_streamed_equals_in_memory_with_the_recorded_bits(tiny_checkpoints, tmp_path, llama_scores, policy):
    document, scores, calib = llama_scores
    model, out = tiny_checkpoints["llama"], tmp_path / "out"
    run_compress(model, out, calib, *POLICY, "--bits-policy", policy, "--scores", str(scores))
    record = json.loads((out / "config.json").read_text())["layerpress"]
    bits = record["layer_bits"]
    params = {name: layer["params"] for name, layer in document["layers"].items()}
    assert set(bits.values()) == {4, 8} and set(bits) == set(params)
    assert record["bits_policy"]["achieved_avg_bits"] == weighted_mean(list(bits.values()), [params[n] for n in bits])
    assert 4.5 < record["bits_policy"]["achieved_avg_bits"] <= 5
    value = (lambda layer: layer[policy]["0.5"]) if policy == "pmpq" else (lambda layer: layer[policy])
    most_sensitive = max(document["layers"], key=lambda name: value(document["layers"][name]))
    assert bits[most_sensitive] == 8

    windows = calibration_windows(tokenize(load_tokenizer(model), load_text(calib)), NSAMPLES, SEQLEN, 0)
    method = METHODS["gptq"]()
    expected = compress_in_memory(
        model, method, Target(), windows, target_for=lambda name: Target(quant=QuantSpec(bits[name], 32)),
        micro_batch=recorded_micro_batch(out),
    )
    streamed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(streamed[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_packed_mixed_bits_load_with_transformers_and_resume_to_the_same_bytes(
    tiny_checkpoints, tmp_path, llama_scores, monkeypatch
):
    _, scores, calib = llama_scores
    model = tiny_checkpoints["llama"]
    options = [*POLICY, "--bits-policy", "cmpq", "--scores", str(scores), "--max-shard-size", "60KB"]
    run_compress(model, tmp_path / "dense", calib, *options)
    run_compress(model, tmp_path / "packed", calib, *options, "--format", "packed")
    config = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    bits = json.loads((tmp_path / "packed" / "config.json").read_text())["layerpress"]["layer_bits"]
    groups = {group["weights"]["num_bits"]: set(group["targets"]) for group in config["config_groups"].values()}
    assert groups == {b: {name for name in bits if bits[name] == b} for b in (4, 8)}
    tokens = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 8]])
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)(tokens).logits
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.float32)
    assert torch.equal(packed(tokens).logits, expected)
    assert main.main(["decompress", "--model", str(tmp_path / "packed"), "--out", str(tmp_path / "decoded")]) == 0
    assert shard_bytes(tmp_path / "decoded") == shard_bytes(tmp_path / "dense")  # decoded with each layer's bits

    with interrupted_at_block(monkeypatch, 2), pytest.raises(AssertionError):  # exit status 130
        run_compress(model, tmp_path / "cut", calib, *options, "--format", "packed")
    run_compress(model, tmp_path / "cut", calib, *options, "--format", "packed")
    assert output_digest(tmp_path / "cut") == output_digest(tmp_path / "packed")


@pytest.mark.parametrize("options,message", [
    (["--method", "wanda", "--avg-bits", "5", "--bits-policy", "cmpq"], "use a method that quantizes"),
    (["--method", "gptq", "--avg-bits", "9", "--bits-policy", "cmpq"], "outside the bit choices"),
    (["--method", "gptq", "--avg-bits", "5", "--bits-policy", "cmpq", "--wbits", "4"], "leave out --wbits"),
    (["--method", "gptq", "--avg-bits", "5", "--bits-policy", "tdmpq", "--bit-choices", "4,16"], "16 bits"),
    (["--method", "gptq", "--avg-bits", "5"], "give --bits-policy too"),
    (["--method", "flap", "--bits-policy", "cmpq", "--avg-bits", "5"], "--bits-policy applies"),
])
def test_bad_bits_options_fail_in_one_line_before_anything_is_written(
    tiny_checkpoints, tmp_path, llama_scores, capsys, options, message
):
    _, scores, calib = llama_scores
    out = tmp_path / "out"
    argv = ["compress", "--model", str(tiny_checkpoints["llama"]), "--out", str(out), "--calib", str(calib),
            "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--scores", str(scores), *options]
    assert main.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("layerpress: error:") and "\n" not in error and message in error
    assert not out.exists()


def test_resume_with_another_policy_is_refused(tiny_checkpoints, tmp_path, llama_scores, capsys, monkeypatch):
    _, scores, calib = llama_scores
    model, out = tiny_checkpoints["llama"], tmp_path / "out"
    with interrupted_at_block(monkeypatch, 1), pytest.raises(AssertionError):
        run_compress(model, out, calib, *POLICY, "--bits-policy", "cmpq", "--scores", str(scores))
    capsys.readouterr()
    argv = ["compress", "--model", str(model), "--out", str(out), "--calib", str(calib), "--nsamples", str(NSAMPLES),
            "--seqlen", str(SEQLEN), "--device", "cpu", *POLICY, "--bits-policy", "pmpq", "--scores", str(scores)]
    assert main.main(argv) == 1
    assert "bits_policy" in capsys.readouterr().err
