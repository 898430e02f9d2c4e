"""FLAP structured pruning: its maths, and tiny OPT, BLOOM and Llama pruned into smaller checkpoints that run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import main
from methods.base import UnitGroup
from methods.flap import Flap, select_global, select_uniform, unit_scores
from methods.statistics import Moments
from streamer.data import calibration_windows, load_text, load_tokenizer, tokenize
from streamer.checkpoint import Checkpoint
from streamer.model import StagedModel, load_model
from streamer.structure import STRUCTURE_KEY
from tests.conftest import FAMILIES, perplexity
from tests.reference import structured_in_memory

NSAMPLES, SEQLEN = 4, 32


def run_flap(model, out, calib, *extra: str) -> int:
    return main.main(["compress", "--model", str(model), "--out", str(out), "--calib", str(calib), "--nsamples",
                      str(NSAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu", "--method", "flap", *extra])


def calibration(model, calib) -> torch.Tensor:
    return calibration_windows(tokenize(load_tokenizer(model), load_text(calib)), NSAMPLES, SEQLEN, 0)


# ---------------------------------------------------------------- the maths

def test_moments_equal_a_direct_computation_over_all_tokens():
    torch.manual_seed(0)
    tokens = torch.randn(1000, 16, dtype=torch.float64) * torch.linspace(0.01, 3, 16) + 1e4  # |mean| ≫ std
    moments = Moments(nn.Linear(16, 4))
    for batch in torch.split(tokens.float(), [1, 7, 300, 2, 690]):  # uneven micro-batches, float32 activations
        moments.update(batch.view(1, -1, 16))
    direct = tokens.float().double()
    assert moments.tokens == 1000
    torch.testing.assert_close(moments.mean, direct.mean(dim=0), rtol=1e-12, atol=0)
    torch.testing.assert_close(moments.variance, direct.var(dim=0, unbiased=False), rtol=1e-9, atol=0)


def random_groups(blocks: int, seed: int) -> list[UnitGroup]:
    """Attention with 4 units of cost 1000 and an MLP of 64 channels of cost 30 per block, random scores."""
    generator = torch.Generator().manual_seed(seed)
    groups = []
    for block in range(blocks):
        groups.append(UnitGroup(block, "attention", torch.randn(4 * 8, generator=generator), 4, 1000))
        groups.append(UnitGroup(block, "mlp", torch.rand(64, generator=generator) * (block + 1), 64, 30))
    return groups


def kept_parameters(groups: list[UnitGroup], masks: list[torch.Tensor]) -> int:
    return sum(int(mask.sum()) * group.cost for group, mask in zip(groups, masks))


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.5])
def test_global_search_hits_the_budget_within_one_unit_keeping_the_best(ratio):
    groups = random_groups(6, seed=int(ratio * 10))
    masks = select_global(groups, ratio)
    budget = (1 - ratio) * sum(group.units * group.cost for group in groups)
    assert abs(kept_parameters(groups, masks) - budget) <= max(group.cost for group in groups)
    scores = [unit_scores(group) for group in groups]
    for score, mask in zip(scores, masks):
        assert mask.any(), "every group keeps at least one unit"
    floors = {(i, int(score.argmax())) for i, score in enumerate(scores)}
    ranked = [(float(score[u]), mask[u].item()) for i, (score, mask) in enumerate(zip(scores, masks))
              for u in range(score.numel()) if (i, u) not in floors]
    assert min(s for s, kept in ranked if kept) >= max(s for s, kept in ranked if not kept)


def test_uniform_search_keeps_the_same_budget_in_every_block():
    groups = random_groups(4, seed=1)
    masks = select_uniform(groups, 0.3)
    for block in range(4):
        members = [(g, m) for g, m in zip(groups, masks) if g.block == block]
        budget = 0.7 * sum(g.units * g.cost for g, _ in members)
        assert abs(sum(int(m.sum()) * g.cost for g, m in members) - budget) <= 30  # one MLP channel
        attention = next(m for g, m in members if g.name == "attention")
        assert int(attention.sum()) == 3  # round(0.7 · 4)


def test_search_refuses_a_ratio_that_leaves_less_than_one_unit_per_group():
    with pytest.raises(ValueError, match="one unit per layer"):
        select_global(random_groups(2, seed=0), 0.99)


@pytest.mark.parametrize("structure", ["AL-AM", "UL-UM"])
def test_attention_scores_are_squared_before_standardizing_as_the_reference_does(structure):
    """The reference's lib/prune.py squares the o_proj metric (attention heads), not the MLP's."""
    groups = random_groups(3, seed=4)
    squared = [UnitGroup(g.block, g.name, g.scores.double().pow(2) if g.name == "attention" else g.scores, g.units,
                         g.cost) for g in groups]
    search = select_global if structure == "AL-AM" else select_uniform
    ours = Flap(ratio=0.4, structure=structure).select(groups)
    assert all(torch.equal(a, b) for a, b in zip(ours, search(squared, 0.4)))
    plain = Flap(ratio=0.4, structure=structure, attention_scores="plain").select(groups)
    assert all(torch.equal(a, b) for a, b in zip(plain, search(groups, 0.4)))
    assert any(not torch.equal(a, b) for a, b in zip(ours, plain)), "the seed must make the two differ"


@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_compensation_keeps_the_mean_output_on_the_calibration_set(with_bias):
    torch.manual_seed(0)
    consumer = nn.Linear(12, 5, bias=with_bias)
    producer = nn.Linear(7, 12)
    inputs = torch.randn(3, 40, 12) * 2 + torch.randn(12) * 3  # channels with different means
    method = Flap()
    statistic = method.statistic(consumer)
    statistic.update(inputs)
    summary = method.summarize(consumer, statistic)
    keep = torch.tensor([True, False, True, False, False, True])  # units of two channels
    pruned, new_consumer = method.prune({"up": producer}, consumer, keep, summary)
    kept = torch.tensor([0, 1, 4, 5, 10, 11])
    assert pruned["up"].weight.shape == (6, 7) and torch.equal(pruned["up"].weight, producer.weight[kept])
    assert new_consumer.weight.shape == (5, 6)
    dense = consumer(inputs).mean(dim=(0, 1))
    smaller = nn.functional.linear(inputs[..., kept], new_consumer.weight, new_consumer.bias).mean(dim=(0, 1))
    torch.testing.assert_close(smaller, dense, rtol=0, atol=1e-5)
    uncompensated = Flap(compensate=False).prune({"up": producer}, consumer, keep, summary)[1]
    assert (uncompensated.bias is None) != with_bias


def test_scores_follow_the_metric():
    consumer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        consumer.weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [1.0, 2.0, 3.0]]))
    moments = Moments(consumer)
    moments.update(torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]]))  # means 2, 0, 2; variances 1, 0, 0
    scores = {metric: Flap(metric=metric).summarize(consumer, moments).score.tolist() for metric in ("IFV", "WIFV", "WIFN")}
    assert scores["IFV"] == [1.0, 0.0, 0.0]
    assert scores["WIFV"] == [2.0, 0.0, 0.0]  # Var · ‖W[:, j]‖²
    assert scores["WIFN"] == pytest.approx([1.0 * 5 ** 0.5, 0.0, 1.5 * 2.0])  # mean|W[:, j]| · √E[x²]


@pytest.mark.parametrize("chunk", [1, 7, 1 << 23])
def test_column_sums_over_row_chunks_equal_the_whole_matrix_in_float64(chunk, monkeypatch):
    import methods.flap as flap

    weight = torch.randn(37, 11, generator=torch.Generator().manual_seed(0)).bfloat16()
    monkeypatch.setattr(flap, "COLUMN_SUM_VALUES", chunk)
    torch.testing.assert_close(flap.column_sums(weight, 2), weight.double().pow(2).sum(dim=0), rtol=1e-12, atol=0)
    torch.testing.assert_close(flap.column_sums(weight, 1), weight.double().abs().sum(dim=0), rtol=1e-12, atol=0)


# ---------------------------------------------------------------- tiny models, streamed

STREAMED_CASES = [(family, ("--metric", "IFV")) for family in FAMILIES] + [
    ("llama", ("--structure", "UL-UM", "--metric", "WIFN", "--no-compensation", "--attention-scores", "plain")),
    # the Wanda-style baseline
]


@pytest.mark.parametrize("family,options", STREAMED_CASES)
def test_streamed_equals_in_memory_and_computes_what_the_masked_dense_model_computes(
    tiny_checkpoints, tmp_path, calib_text, family, options
):
    model = tiny_checkpoints[family]
    out = tmp_path / "out"
    assert run_flap(model, out, calib_text, "--ratio", "0.3", *options) == 0

    method = Flap.from_args(main.build_parser().parse_args(
        ["compress", "--model", "m", "--out", "o", "--ratio", "0.3", *options]))
    expected, masked, direct = structured_in_memory(model, method, calibration(model, calib_text))
    pruned = load_model(out)
    state = pruned.state_dict()
    for name, tensor in masked.state_dict().items():  # every tensor the pruning did not touch is the dense one
        torch.testing.assert_close(state[name], expected.get(name, tensor), rtol=0, atol=1e-6, msg=name)
    assert expected.keys() <= state.keys()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, masked(ids).logits, rtol=0, atol=1e-4)

    # the statistics pass: mean (and, for IFV, the score: the variance) over all calibration tokens
    for (block, group), (mean, variance) in direct.items():
        stored = load_file(out / ".layerpress" / "statistics" / f"summary-{block:05d}.safetensors")
        torch.testing.assert_close(stored[f"{group}.mean"], mean, rtol=1e-5, atol=1e-6)
        if method.metric == "IFV":
            torch.testing.assert_close(stored[f"{group}.score"], variance, rtol=1e-5, atol=1e-6)


def parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_output_is_smaller_loads_generates_and_evaluates(tiny_checkpoints, tmp_path, calib_text, family, capsys):
    model = tiny_checkpoints[family]
    out = tmp_path / "out"
    assert run_flap(model, out, calib_text, "--ratio", "0.25", "--max-shard-size", "30KB") == 0
    record = json.loads((out / "config.json").read_text())["layerpress"]["parameters"]
    staged = StagedModel(Checkpoint(model), torch.device("cpu"))
    largest_unit = max(layout.unit_cost(staged.blocks[0]) for layout in staged.layouts.values())
    assert abs(record["kept"] - 0.75 * record["prunable"]) <= largest_unit

    dense, pruned = load_model(model), load_model(out)
    added_biases = len(json.loads((out / "config.json").read_text())[STRUCTURE_KEY]["biases"]) * 3 * 64
    assert parameters(pruned) == parameters(dense) - (record["prunable"] - record["kept"]) + added_biases
    ids = torch.tensor([[1, 2, 3, 4]])
    generated = pruned.generate(ids, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 10)
    assert main.main(["eval", "--model", str(out), "--seqlen", str(SEQLEN), "--windows", "2", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["ppl"] < float("inf")
    with pytest.raises(RuntimeError, match="mismatched"):  # config.json alone cannot describe these shapes
        AutoModelForCausalLM.from_pretrained(out)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stage", ["summarize", "prune"])
def test_a_killed_run_resumes_to_the_same_bytes(tiny_checkpoints, tmp_path, calib_text, monkeypatch, stage):
    model = tiny_checkpoints["llama"]
    assert run_flap(model, tmp_path / "clean", calib_text, "--max-shard-size", "30KB") == 0

    original, calls = getattr(Flap, stage), []

    def dies_on_the_second_block(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # two groups per block: the third call is block 1's
            raise Interrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Flap, stage, dies_on_the_second_block)
    with pytest.raises(Interrupt):
        run_flap(model, tmp_path / "killed", calib_text, "--max-shard-size", "30KB")
    monkeypatch.setattr(Flap, stage, original)
    assert not (tmp_path / "killed" / "model.safetensors.index.json").exists()
    assert run_flap(model, tmp_path / "killed", calib_text, "--max-shard-size", "30KB") == 0
    clean = sorted(p.name for p in (tmp_path / "clean").glob("*.safetensors"))
    assert clean == sorted(p.name for p in (tmp_path / "killed").glob("*.safetensors"))
    for name in clean:
        assert (tmp_path / "clean" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name


def test_unstructured_options_and_impossible_ratios_are_refused(tiny_checkpoints, tmp_path, calib_text, capsys):
    model = tiny_checkpoints["opt"]
    assert run_flap(model, tmp_path / "a", calib_text, "--sparsity", "0.5") == 1
    assert "--sparsity applies to unstructured methods only" in capsys.readouterr().err
    assert run_flap(model, tmp_path / "b", calib_text, "--ratio", "1.0") == 1
    assert "--ratio must be in [0, 1)" in capsys.readouterr().err
    assert run_flap(model, tmp_path / "c", calib_text, "--ratio", "0.995") == 1
    assert "one unit per layer" in capsys.readouterr().err


def test_compensated_first_attention_has_the_dense_mean_output_on_the_calibration_set(tiny_checkpoints, tmp_path,
                                                                                        calib_text):
    """Block 0 sees the same inputs in both models and its kept heads compute what they did: only the bias
    stands in for the removed ones, and it must restore the mean output over the calibration tokens."""
    model = tiny_checkpoints["llama"]
    out = tmp_path / "out"
    assert run_flap(model, out, calib_text, "--ratio", "0.5", "--structure", "UL-UM") == 0
    windows = calibration(model, calib_text)
    means = {}
    for name, loaded in (("dense", load_model(model)), ("pruned", load_model(out))):
        outputs = []
        o_proj = loaded.model.layers[0].self_attn.o_proj
        hook = o_proj.register_forward_hook(lambda _, args, output: outputs.append(output))
        with torch.no_grad():
            loaded(windows)
        hook.remove()
        means[name] = torch.cat(outputs).mean(dim=(0, 1))
        means[name + " width"] = o_proj.in_features
    assert means["pruned width"] == means["dense width"] // 2
    torch.testing.assert_close(means["pruned"], means["dense"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_flap_beats_the_wanda_style_structured_baseline_on_smollm2(smollm2, tmp_path, capsys):
    """SmolLM2-135M, 20% of its heads' and channels' parameters removed; calibration 16 x 256 of WikiText-2 valid,
    perplexity on the first 8 windows x 512 of WikiText-2 test (small, to keep CI short)."""
    pruned = {}
    for name, options in (("flap", ()), ("wanda-sp", ("--structure", "UL-UM", "--metric", "WIFN",
                                                      "--no-compensation", "--attention-scores", "plain"))):
        out = tmp_path / name
        assert main.main(["-q", "compress", "--model", str(smollm2), "--out", str(out), "--method", "flap",
                          "--ratio", "0.2", *options, "--nsamples", "16", "--seqlen", "256", "--device", "cpu"]) == 0
        pruned[name] = perplexity(out, 8)
    dense = perplexity(smollm2, 8)
    print(f"SmolLM2 8x512 perplexity: dense {dense:.2f}, " + ", ".join(f"{k} {v:.2f}" for k, v in pruned.items()))
    assert dense < pruned["flap"] < pruned["wanda-sp"], pruned
    generated = load_model(tmp_path / "flap").generate(torch.tensor([[1, 504, 3303]]), max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, 11)
