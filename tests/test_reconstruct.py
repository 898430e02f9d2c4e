"""Layer-wise reconstruction (--reconstruct): the spec of methods/reconstruct.py and of its place in compress."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import main
import methods.reconstruct as recon
import streamer.model
from methods import METHODS, Target
from methods.reconstruct import Reconstruction, reconstruct
from streamer.adapters import adapter_for
from streamer.adapters.llama import LLAMA
from streamer.data import calibration_windows, load_text, load_tokenizer, tokenize
from tests.conftest import FAMILIES
from tests.reference import compress_in_memory, first_block_inputs, load_with_biases, recorded_micro_batch
from tests.test_compress import NSAMPLES, SEQLEN, load_state, run_compress

FAST = ["--recon-steps", "8", "--recon-lr", "1e-2", "--lora-rank", "4"]


def pruned_linear(rows: int = 24, columns: int = 32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(columns, rows, bias=False).requires_grad_(False)
    layer.weight[layer.weight.abs() < layer.weight.abs().median()] = 0
    return layer


def fit_one_layer(settings: Reconstruction, layer: nn.Linear) -> None:
    """Reconstruct a lone pruned layer towards a random dense layer's outputs."""
    dense = torch.randn_like(layer.weight)
    inputs = [torch.randn(2, 5, layer.in_features) for _ in range(3)]
    batches = [(x, x @ dense.T) for x in inputs]
    reconstruct(layer, {"layer": layer}, {}, layer, batches, settings, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("update", ["masklora", "scalelora"])
def test_sparse_updates_keep_every_zero_and_change_the_rest(update):
    layer = pruned_linear()
    before = layer.weight.clone()
    fit_one_layer(Reconstruction(subsets=(update,), steps=20, lr=0.05, rank=4), layer)
    assert torch.equal(layer.weight == 0, before == 0)
    kept = before != 0
    assert (layer.weight[kept] != before[kept]).float().mean() > 0.9


def test_plain_lora_warns_and_fills_the_pruned_weights():
    with pytest.warns(UserWarning, match="no longer sparse"):
        settings = Reconstruction(subsets=("lora",), steps=20, lr=0.05, rank=4)
    layer = pruned_linear()
    fit_one_layer(settings, layer)
    assert (layer.weight == 0).float().mean() < 0.01


def test_merge_checks_the_zeros_instead_of_assuming_them(monkeypatch):
    monkeypatch.setattr(recon._MaskLoRA, "combine", recon._LoRA.combine)  # a masklora that forgot its mask
    layer = pruned_linear()
    before = layer.weight.clone()
    with pytest.raises(ValueError, match="zeros"):
        fit_one_layer(Reconstruction(subsets=("masklora",), steps=5, lr=0.05, rank=4), layer)
    assert torch.equal(layer.weight, before) and not hasattr(layer, "parametrizations")


def test_scalelora_starts_at_the_pruned_weights_and_uses_its_whole_rank():
    layer = pruned_linear()
    scale = recon._ScaleLoRA(layer.weight, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(scale(layer.weight), layer.weight, rtol=1e-6, atol=0)
    assert len({tuple(row.tolist()) for row in scale.A}) == 4  # not PERP's all-equal start, which stays rank 1


def test_the_learning_rate_warms_up_then_decays_linearly():
    factor = recon.schedule(Reconstruction(subsets=("norms",), steps=10, warmup=0.2))
    factors = [factor(step) for step in range(10)]
    assert factors[0] < factors[1] < factors[2] == 1.0
    assert all(a > b > 0 for a, b in zip(factors[2:], factors[3:]))


@pytest.mark.parametrize("sizes, probed", [([1] * 32, 8), ([3] * 5, 3), ([3, 3, 2], 3), ([8, 8], 1), ([2, 2], 2)])
def test_the_reported_errors_are_measured_on_eight_windows_whatever_the_micro_batch(sizes, probed):
    batches = [(torch.zeros(size, 4), torch.zeros(size, 4)) for size in sizes]
    seen = []
    recon.probe_loss(lambda inputs: seen.append(inputs.shape[0]) or inputs, batches)
    assert len(seen) == probed


@pytest.mark.parametrize("text, message", [("masklora,scalelora", "one weight update"), ("norms,bias", "unknown")])
def test_bad_subsets_are_refused(tiny_checkpoints, tmp_path, calib_text, capsys, text, message):
    argv = ["compress", "--model", str(tiny_checkpoints["llama"]), "--out", str(tmp_path / "out"),
            "--calib", str(calib_text), "--reconstruct", text]
    try:
        code = main.main(argv)
    except SystemExit as exit:  # argparse refuses unknown names itself
        code = exit.code
    assert code != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_biases_are_refused_where_the_family_cannot_have_them(tiny_checkpoints, tmp_path, calib_text, capsys,
                                                              monkeypatch):
    llama_without_flags = dataclasses.replace(LLAMA, bias_flags=())  # like Mistral: no bias flag in its config
    monkeypatch.setattr(streamer.model, "adapter_for", lambda config: llama_without_flags)
    argv = ["compress", "--model", str(tiny_checkpoints["llama"]), "--out", str(tmp_path / "out"),
            "--calib", str(calib_text), "--device", "cpu", "--reconstruct", "biases"]
    assert main.main(argv) == 1
    assert "no biases" in capsys.readouterr().err


def test_weight_updates_are_refused_with_quantization(tiny_checkpoints, tmp_path, calib_text, capsys):
    argv = ["compress", "--model", str(tiny_checkpoints["llama"]), "--out", str(tmp_path / "out"), "--calib",
            str(calib_text), "--device", "cpu", "--wbits", "4", "--reconstruct", "norms,masklora"]
    assert main.main(argv) == 1
    assert "off their grid" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quantized_weights_stay_on_their_grid_when_norms_and_biases_are_trained(tiny_checkpoints, tmp_path,
                                                                                 calib_text):
    """Block 0 sees the same inputs with and without reconstruction, so its packed integers must be the same; the
    trained norms and biases are what changes."""
    model, quantized = tiny_checkpoints["llama"], ["--method", "gptq", "--wbits", "4", "--format", "packed"]
    run_compress(model, tmp_path / "plain", calib_text, *quantized)
    run_compress(model, tmp_path / "recon", calib_text, *quantized, "--reconstruct", "biases,norms", *FAST)
    plain, recon = load_state(tmp_path / "plain"), load_state(tmp_path / "recon")
    packed = [name for name in plain if name.startswith("model.layers.0.") and name.endswith("weight_packed")]
    assert packed and all(torch.equal(plain[name], recon[name]) for name in packed)
    assert not torch.equal(plain["model.layers.0.input_layernorm.weight"], recon["model.layers.0.input_layernorm.weight"])
    assert "model.layers.0.mlp.down_proj.bias" in recon


def calibration(model_dir, calib_text) -> torch.Tensor:
    return calibration_windows(tokenize(load_tokenizer(model_dir), load_text(calib_text)), NSAMPLES, SEQLEN, 0)


@pytest.mark.filterwarnings("ignore:plain lora")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("subset", ["biases", "norms", "masklora", "scalelora", "lora"])
def test_reconstruction_brings_a_pruned_block_closer_to_the_dense_one(tiny_checkpoints, calib_text, family, subset):
    model_dir = tiny_checkpoints[family]
    model = load_with_biases(model_dir).eval().requires_grad_(False)
    adapter = adapter_for(model.config.to_dict())
    block = model.get_submodule(adapter.blocks)[0]
    inputs, forward = first_block_inputs(model, calibration(model_dir, calib_text))

    def run(x):
        return forward(block, x)

    def error() -> float:
        with torch.no_grad():
            return sum(nn.functional.mse_loss(run(x), y).item() for x, y in zip(inputs, dense)) / len(inputs)

    with torch.no_grad():
        dense = [run(x) for x in inputs]
        linears = {name: block.get_submodule(name) for name in adapter.linear_names}
        for layer in linears.values():
            layer.weight.copy_(METHODS["magnitude"]().compress(layer, None, Target(sparsity=0.6)).weight)
    pruned = error()
    norms = adapter.block_norms(block)
    settings = Reconstruction(subsets=(subset,), steps=32, lr=1e-3, rank=4)
    reconstruct(block, linears, norms, run, list(zip(inputs, dense)), settings, torch.Generator().manual_seed(0))
    assert error() < 0.99 * pruned  # a no-op (or a wrong merge) would leave it as it is


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_reconstruction_equals_in_memory(tiny_checkpoints, tmp_path, calib_text, family):
    model = tiny_checkpoints[family]
    out = tmp_path / "out"
    run_compress(model, out, calib_text, "--method", "wanda", "--sparsity", "0.6",
                 "--reconstruct", "biases,norms,masklora", *FAST)
    settings = Reconstruction(subsets=("biases", "norms", "masklora"), steps=8, lr=1e-2, rank=4)
    expected = compress_in_memory(model, METHODS["wanda"](), Target(sparsity=0.6), calibration(model, calib_text),
                                  reconstruction=settings, micro_batch=recorded_micro_batch(out))
    streamed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(streamed[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_new_biases_are_written_and_the_output_loads_with_them(tiny_checkpoints, tmp_path, calib_text):
    model = tiny_checkpoints["llama"]
    out = tmp_path / "out"
    run_compress(model, out, calib_text, "--method", "wanda", "--reconstruct", "biases", *FAST)
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    record = config["layerpress"]
    assert record["reconstruction"]["subsets"] == ["biases"]
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = load_state(out)
    adapter = adapter_for(config)
    biases = [f"{adapter.blocks}.{i}.{name}.bias" for i in range(3) for name in adapter.linear_names]
    assert all(state[name].abs().sum() > 0 for name in biases)
    assert len(state) == len(load_state(model)) + len(biases)
    assert record["reconstruction_summary"]["trained_parameters"] == sum(state[name].numel() for name in biases)


@pytest.mark.parametrize("update", ["masklora", "scalelora"])
def test_magnitude_masks_survive_reconstruction_in_every_block(tiny_checkpoints, tmp_path, calib_text, update):
    """Magnitude masks do not depend on the data, so reconstruction must write exactly the zeros of a plain run."""
    model = tiny_checkpoints["opt"]
    run_compress(model, tmp_path / "plain", calib_text, "--method", "magnitude", "--sparsity", "0.7")
    run_compress(model, tmp_path / "rec", calib_text, "--method", "magnitude", "--sparsity", "0.7",
                 "--reconstruct", update, *FAST)
    plain, rec = load_state(tmp_path / "plain"), load_state(tmp_path / "rec")
    adapter = adapter_for(json.loads((model / "config.json").read_text()))
    pruned = [name for name in plain if any(name.endswith(f"{linear}.weight") for linear in adapter.linear_names)]
    assert len(pruned) == 3 * len(adapter.linear_names)
    for name in pruned:
        assert torch.equal(plain[name] == 0, rec[name] == 0), name
        assert not torch.equal(plain[name], rec[name]), name


class Killed(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("offload", [False, True])
def test_a_killed_reconstruction_run_resumes_bit_identically(tiny_checkpoints, tmp_path, calib_text, monkeypatch,
                                                             offload):
    model = tiny_checkpoints["llama"]
    options = ["--method", "sparsegpt", "--reconstruct", "biases,norms,scalelora", *FAST]
    if offload:
        options += ["--offload-activations", str(tmp_path / "acts")]
    run_compress(model, tmp_path / "whole", calib_text, *options)

    steps, real_step = int(FAST[FAST.index("--recon-steps") + 1]), torch.optim.AdamW.step
    taken = []

    def killed_mid_training_of_block_one(optimizer, *args, **kwargs):
        taken.append(1)
        if len(taken) == steps + steps // 2:  # block 0 trained and journaled; block 1 halfway through its steps
            raise Killed
        return real_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", killed_mid_training_of_block_one)
    argv = ["compress", "--model", str(model), "--out", str(tmp_path / "resumed"), "--calib", str(calib_text),
            "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu", *options]
    assert main.main(argv) == 130
    assert json.loads((tmp_path / "resumed/.layerpress/journal.json").read_text())["body"]["blocks_done"] == 1
    monkeypatch.undo()
    run_compress(model, tmp_path / "resumed", calib_text, *options)

    whole, resumed = load_state(tmp_path / "whole"), load_state(tmp_path / "resumed")
    assert whole.keys() == resumed.keys()
    for name, tensor in whole.items():
        assert torch.equal(resumed[name], tensor), name
