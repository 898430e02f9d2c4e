"""Quantization: the grid and its packing, GPTQ and joint prune-and-quantize maths, the packed and sparse formats."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from compressed_tensors.compressors.pack_quantized import pack_to_int32
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from methods import METHODS, LayerResult, QuantSpec, Target
from methods.quant import BITS, round_to_nearest
from methods.statistics import Gram
import methods.quant
import streamer.formats
from streamer.formats import FORMATS, LayerPlan, pack_bits, unpack_bits
from streamer.data import calibration_windows, load_text, load_tokenizer, tokenize
from tests.conftest import FAMILIES
from tests.reference import compress_in_memory, recorded_micro_batch
from tests.test_compress import NSAMPLES, SEQLEN, load_state, run_compress
from tests.test_textbook import assert_matches, textbook_sweep

GROUPSIZES = (None, 16, 40)  # per row; dividing the 96 columns; not dividing them (a last, smaller group)


def correlated_inputs(columns: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated, unevenly scaled features, like a transformer's (where GPTQ's updates pay off)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    scales = torch.rand(columns, generator=generator) * 3 + 0.1
    return (torch.randn(tokens, columns, generator=generator) @ mixing) * scales


def layer_with_statistic(rows: int = 48, columns: int = 96, seed: int = 0) -> tuple[nn.Linear, Gram, torch.Tensor]:
    torch.manual_seed(seed)
    layer = nn.Linear(columns, rows, bias=False)
    inputs = correlated_inputs(columns, seed=seed)
    statistic = Gram(layer)
    statistic.update(inputs)
    return layer, statistic, inputs


def output_error(layer: nn.Linear, weight: torch.Tensor, inputs: torch.Tensor) -> float:
    return (inputs @ layer.weight.detach().T - inputs @ weight.T).norm().item()


@pytest.mark.parametrize("bits", BITS)
def test_bit_packing_round_trips_and_matches_compressed_tensors(bits):
    torch.manual_seed(bits)
    for columns in (1, 31, 32, 33, 96, 100):
        ints = torch.randint(0, 1 << bits, (5, columns), dtype=torch.uint8)
        packed = pack_bits(ints, bits)
        assert packed.dtype == torch.int32 and packed.shape == (5, -(-columns * bits // 32))
        assert torch.equal(unpack_bits(packed, bits, columns), ints)
        signed = (ints.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)  # compressed-tensors' integers
        assert torch.equal(packed, pack_to_int32(signed, bits)), f"{bits} bits, {columns} columns"


def test_reading_a_grid_in_row_chunks_gives_the_same_weight(monkeypatch):
    """read_grid's float32 steps are bounded by GRID_CHUNK_VALUES, not by the layer: the weight is the same."""
    generator = torch.Generator().manual_seed(0)
    ints = torch.randint(0, 16, (37, 96), dtype=torch.uint8, generator=generator)
    scale = torch.rand(37, 3, generator=generator).to(torch.bfloat16)
    zero = torch.randint(0, 16, (37, 3), dtype=torch.uint8, generator=generator)
    g_idx = torch.randperm(96, generator=generator) % 3
    whole = ((ints.float() - zero[:, g_idx].float()) * scale[:, g_idx].float()).to(torch.bfloat16)
    monkeypatch.setattr(methods.quant, "GRID_CHUNK_VALUES", 200)  # two rows at a time, the last chunk short
    assert torch.equal(methods.quant.read_grid(ints, scale, zero, g_idx), whole)


def test_packing_a_layer_in_row_chunks_gives_the_same_words(monkeypatch):
    """The int64 working copies are bounded by PACK_CHUNK_VALUES, not by the layer: same words either way."""
    ints = torch.randint(0, 16, (37, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = pack_bits(ints, 4)
    monkeypatch.setattr(streamer.formats, "PACK_CHUNK_VALUES", 300)  # three rows at a time, the last chunk short
    assert torch.equal(pack_bits(ints, 4), whole)
    assert torch.equal(unpack_bits(whole, 4, 100), ints)


@pytest.mark.parametrize("fmt", ["packed", "sparse"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("groupsize", GROUPSIZES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_format_round_trip_gives_back_the_integers(fmt, bits, groupsize, symmetric):
    torch.manual_seed(0)
    spec = QuantSpec(bits, groupsize, symmetric)
    weight = torch.randn(40, 96) * torch.rand(40, 1)
    mask = torch.rand(40, 96) < 0.5
    record = round_to_nearest(weight.masked_fill(mask, 0), spec)
    dense = record.dequantize()
    plan = LayerPlan("layer.weight", torch.float32, (40, 96), torch.float32, spec, int((~mask).sum()))
    if fmt == "packed" and groupsize == 40:
        with pytest.raises(Exception, match="divide"):  # compressed-tensors needs whole groups
            FORMATS[fmt].check(plan)
        return
    tensors = FORMATS[fmt].encode(plan, dense, LayerResult(dense, mask, quant=record))
    assert [(spec.name, spec.dtype, spec.shape) for spec in FORMATS[fmt].specs(plan)] == [
        (name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()
    ]
    parts = {name.removeprefix("layer.weight_"): tensor for name, tensor in tensors.items()}
    if fmt == "packed":
        assert torch.equal(unpack_bits(parts["packed"], bits, 96), record.ints)
    else:  # the kept weights' integers, row-major, as one bit stream
        kept = int((~mask).sum())
        assert torch.equal(unpack_bits(parts["packed"].unsqueeze(0), bits, kept)[0], record.ints[~mask])
    assert ("zero_point" in parts) == (not symmetric)
    assert torch.equal(FORMATS[fmt].decode(plan, parts), dense)


@pytest.mark.parametrize("bits,groupsize", [(4, None), (4, 32), (3, 32), (2, 16), (8, None)])
@pytest.mark.parametrize("act_order", [None, "weight", "group"])
def test_gptq_lands_on_the_textbook_grid_and_reconstructs_better_than_rtn(bits, groupsize, act_order):
    """Its integers, scales, zero points and groups are those of the textbook GPTQ (tests/textbook.py), and the
    layer's outputs are nearer the dense ones than round-to-nearest's."""
    layer, statistic, inputs = layer_with_statistic()
    target = Target(quant=QuantSpec(bits, groupsize, symmetric=False, act_order=act_order))
    gptq = METHODS["gptq"]().compress(layer, statistic, target)
    rtn = METHODS["rtn"]().compress(layer, None, Target(quant=QuantSpec(bits, groupsize, symmetric=False)))
    assert output_error(layer, gptq.weight, inputs) < output_error(layer, rtn.weight, inputs)
    assert_matches(gptq, textbook_sweep(gptq, layer, inputs, target, METHODS["gptq"]().blocksize), layer)
    if act_order == "group" and groupsize is not None:
        assert not torch.equal(gptq.quant.g_idx, torch.arange(96) // groupsize)  # groups follow the visit order


@pytest.mark.parametrize("sparsity,pattern", [(0.5, None), (0.7, None), (0.0, (2, 4))])
@pytest.mark.parametrize("symmetric", [True, False])
def test_joint_sparsity_is_exact_and_kept_weights_lie_on_the_textbook_grid(sparsity, pattern, symmetric):
    """Exactly the announced count pruned, and the weight is (q − z)·s of the textbook joint sweep's integers and
    grids (tests/textbook.py: each group's grid fitted, when the sweep reaches it, to what the group keeps)."""
    layer, statistic, inputs = layer_with_statistic()
    method = METHODS["sparsegpt"](blocksize=32)
    target = Target(sparsity=sparsity, pattern=pattern, quant=QuantSpec(4, 32, symmetric))
    result = method.compress(layer, statistic, target)

    assert int(result.mask.sum()) == method.pruned_count(48, 96, target)
    assert (result.weight[result.mask] == 0).all()
    if pattern is not None:
        assert (result.mask.view(48, -1, 4).sum(dim=2) == 2).all()
    assert_matches(result, textbook_sweep(result, layer, inputs, target, 32), layer)


@pytest.mark.parametrize("sparsity,pattern", [(0.5, None), (0.7, None), (0.0, (2, 4))])
def test_joint_sweep_beats_pruning_then_rounding(sparsity, pattern):
    """Quantization errors propagated through the same sweep are compensated by the columns not yet visited, so
    one joint sweep reconstructs better, over a few random layers, than SparseGPT followed by round-to-nearest.
    (At 3 bits, where rounding errors weigh; at 4 bits and 2:4 the two are within a fraction of a percent.)"""
    spec = QuantSpec(3, 32, symmetric=False)
    ratios = []
    for seed in range(4):
        layer, statistic, inputs = layer_with_statistic(seed=seed)
        joint = METHODS["sparsegpt"](blocksize=32).compress(layer, statistic, Target(sparsity, pattern, spec))
        pruned = METHODS["sparsegpt"](blocksize=32).compress(layer, statistic, Target(sparsity, pattern))
        rounded = round_to_nearest(pruned.weight, spec).dequantize()
        ratios.append(output_error(layer, joint.weight, inputs) / output_error(layer, rounded, inputs))
    assert sum(ratios) / len(ratios) < 1


CASES = {
    "gptq": (["--method", "gptq", "--wbits", "4", "--groupsize", "16", "--act-order"],
             "gptq", Target(quant=QuantSpec(4, 16, True, "weight"))),
    "joint": (["--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "3", "--groupsize", "32", "--asym"],
              "sparsegpt", Target(sparsity=0.5, quant=QuantSpec(3, 32, False))),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_quantization_equals_in_memory(tiny_checkpoints, tmp_path, calib_text, family, case):
    model = tiny_checkpoints[family]
    options, method, target = CASES[case]
    run_compress(model, tmp_path / "out", calib_text, *options)
    windows = calibration_windows(tokenize(load_tokenizer(model), load_text(calib_text)), NSAMPLES, SEQLEN, 0)
    expected = compress_in_memory(model, METHODS[method](), target, windows,
                                  micro_batch=recorded_micro_batch(tmp_path / "out"))
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(streamed[name], tensor, rtol=0, atol=1e-6, msg=name)


def compress_formats(model, tmp_path, calib_text, options: list[str], formats: list[str]) -> None:
    for fmt in formats:
        run_compress(model, tmp_path / fmt, calib_text, *options, "--format", fmt, "--max-shard-size", "60KB")


def shard_bytes(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.glob("*.safetensors"))}


@pytest.mark.parametrize("options,formats", [
    (["--method", "sparsegpt", "--sparsity", "0.6", "--wbits", "4", "--groupsize", "16", "--asym"],
     ["packed", "sparse"]),
    (["--method", "wanda", "--sparsity", "0.5"], ["sparse"]),
    (["--method", "gptq", "--wbits", "3", "--act-order", "group", "--groupsize", "32"], ["packed"]),
], ids=["joint", "pruned", "gptq-g_idx"])
def test_decompress_is_bit_identical_to_dense(tiny_checkpoints, tmp_path, calib_text, options, formats):
    model = tiny_checkpoints["llama"]
    formats = ["dense", *formats]
    compress_formats(model, tmp_path, calib_text, options, formats)
    dense = shard_bytes(tmp_path / "dense")
    assert len(dense) > 1
    for fmt in formats[1:]:
        assert sum(map(len, shard_bytes(tmp_path / fmt).values())) < sum(map(len, dense.values()))
        assert main_ok("decompress", "--model", str(tmp_path / fmt), "--out", str(tmp_path / f"{fmt}-dense"))
        assert shard_bytes(tmp_path / f"{fmt}-dense") == dense, fmt
    if "gptq" in options:
        assert "g_idx" in json.dumps(list(load_state(tmp_path / "packed")))


def main_ok(*argv: str) -> bool:
    import main

    return main.main(list(argv)) == 0


@pytest.mark.parametrize("act_order", [[], ["--act-order"]])
def test_packed_output_loads_with_compressed_tensors_and_gives_the_dense_logits(
    tiny_checkpoints, tmp_path, calib_text, act_order
):
    model = tiny_checkpoints["llama"]
    compress_formats(model, tmp_path, calib_text, ["--method", "gptq", "--wbits", "4", "--groupsize", "32", *act_order],
                     ["dense", "packed"])
    packed_config = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert packed_config["format"] == "pack-quantized" and packed_config["ignore"] == ["lm_head"]
    tokens = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 8]])
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    expected = dense(tokens).logits
    compressed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.float32)
    assert torch.equal(compressed(tokens).logits, expected)  # decompressed by compressed-tensors on first forward
    dequantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "packed", dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    for name, tensor in dense.state_dict().items():
        assert torch.equal(dequantized.state_dict()[name], tensor), name


def test_asymmetric_packed_layers_decompress_with_compressed_tensors(tiny_checkpoints, tmp_path, calib_text):
    """transformers cannot load asymmetric pack-quantized checkpoints with compressed-tensors 0.20 (it expects
    unpacked zero points; llm-compressor issue 1618), so the package's own decompressor reads each layer."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    model = tiny_checkpoints["opt"]
    compress_formats(model, tmp_path, calib_text, ["--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "4",
                                                   "--groupsize", "32", "--asym"], ["dense", "packed"])
    config = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], weights=config["config_groups"]["group_0"]["weights"])
    dense, packed = load_state(tmp_path / "dense"), load_state(tmp_path / "packed")
    layers = [name.removesuffix("_packed") for name in packed if name.endswith("weight_packed")]
    assert len(layers) == 3 * 6
    for name in layers:
        parts = {key.removeprefix(name.removesuffix("weight")): tensor for key, tensor in packed.items()
                 if key.startswith(name + "_")}
        assert torch.equal(PackedQuantizationCompressor.decompress(parts, scheme)["weight"], dense[name]), name


def test_eval_reads_packed_and_sparse_outputs_as_their_dense_weights(tiny_checkpoints, tmp_path, calib_text, capsys):
    model = tiny_checkpoints["bloom"]
    compress_formats(model, tmp_path, calib_text, ["--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "8"],
                     ["dense", "packed", "sparse"])
    perplexities = []
    for fmt in ("dense", "packed", "sparse"):
        capsys.readouterr()
        assert main_ok("eval", "--model", str(tmp_path / fmt), "--data", str(calib_text), "--seqlen", "32",
                       "--windows", "4", "--device", "cpu")
        perplexities.append(json.loads(capsys.readouterr().out.splitlines()[-1])["ppl"])
    assert perplexities[0] == perplexities[1] == perplexities[2]


@pytest.mark.parametrize("options,message", [
    (["--method", "gptq"], "needs a bit width"),
    (["--method", "gptq", "--wbits", "4", "--sparsity", "0.5"], "only quantizes"),
    (["--method", "wanda", "--wbits", "4"], "does not quantize"),
    (["--method", "rtn", "--wbits", "4", "--act-order"], "act-order"),
    (["--method", "sparsegpt", "--pattern", "2:4", "--wbits", "4", "--act-order"], "N:M"),
    (["--method", "sparsegpt", "--groupsize", "32"], "give --wbits"),
    (["--method", "sparsegpt", "--format", "packed"], "give --wbits"),
    (["--method", "gptq", "--wbits", "4", "--groupsize", "48", "--format", "packed"], "divide"),
    (["--method", "gptq", "--wbits", "4", "--format", "sparse"], "--sparsity or --pattern"),
])
def test_impossible_quantization_settings_fail_before_anything_is_written(
    tiny_checkpoints, tmp_path, calib_text, capsys, options, message
):
    import main

    out = tmp_path / "out"
    argv = ["compress", "--model", str(tiny_checkpoints["llama"]), "--out", str(out), "--calib", str(calib_text),
            "--nsamples", "2", "--seqlen", "16", "--device", "cpu", *options]
    assert main.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("layerpress: error: ") and "\n" not in error and message in error
    assert not out.exists()


def test_decompress_refuses_dense_outputs(tiny_checkpoints, tmp_path, capsys):
    assert not main_ok("decompress", "--model", str(tiny_checkpoints["llama"]), "--out", str(tmp_path / "out"))
    assert "nothing to decompress" in capsys.readouterr().err


@contextmanager
def interrupted_at_block(monkeypatch, index: int) -> Iterator[None]:
    """Within: compress is interrupted (as by Ctrl-C) when it reaches block `index`."""
    import streamer.commands.compress

    compress_block = streamer.commands.compress.compress_block

    def stop(context, *args, **kwargs):
        if context.index == index:
            raise KeyboardInterrupt
        return compress_block(context, *args, **kwargs)

    monkeypatch.setattr(streamer.commands.compress, "compress_block", stop)
    try:
        yield
    finally:
        monkeypatch.setattr(streamer.commands.compress, "compress_block", compress_block)


def test_interrupted_packed_compress_and_decompress_resume_to_the_same_bytes(
    tiny_checkpoints, tmp_path, calib_text, monkeypatch
):
    import streamer.decoded

    model = tiny_checkpoints["llama"]
    options = ["--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "4", "--groupsize", "32", "--asym"]
    compress_formats(model, tmp_path / "whole", calib_text, options, ["packed"])
    assert main_ok("decompress", "--model", str(tmp_path / "whole" / "packed"), "--out", str(tmp_path / "whole-dense"))

    with interrupted_at_block(monkeypatch, 2), pytest.raises(AssertionError):  # main.py exits 130, not 0
        compress_formats(model, tmp_path / "cut", calib_text, options, ["packed"])
    compress_formats(model, tmp_path / "cut", calib_text, options, ["packed"])
    assert shard_bytes(tmp_path / "cut" / "packed") == shard_bytes(tmp_path / "whole" / "packed")

    read, calls = streamer.decoded.DecodedCheckpoint.read, []

    def stop_after_five_tensors(self, names):
        calls.append(names)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return read(self, names)

    monkeypatch.setattr(streamer.decoded.DecodedCheckpoint, "read", stop_after_five_tensors)
    assert not main_ok("decompress", "--model", str(tmp_path / "cut" / "packed"), "--out", str(tmp_path / "cut-dense"))
    monkeypatch.setattr(streamer.decoded.DecodedCheckpoint, "read", read)
    assert main_ok("decompress", "--model", str(tmp_path / "cut" / "packed"), "--out", str(tmp_path / "cut-dense"))
    assert shard_bytes(tmp_path / "cut-dense") == shard_bytes(tmp_path / "whole-dense")


@pytest.mark.parametrize("compute", [None, "float32"])
def test_half_precision_checkpoints_keep_scales_exact(tiny_checkpoints, tokenizer, tmp_path, calib_text, compute):
    """Scales are fitted in the compute dtype and stored in it, so packed outputs of a bfloat16 checkpoint still
    decompress to exactly the dense output, whether blocks run in bfloat16 or in float32."""
    model = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.bfloat16).save_pretrained(model)
    tokenizer.save_pretrained(model)
    options = ["--method", "gptq", "--wbits", "4", "--groupsize", "32", *(["--dtype", compute] if compute else [])]
    compress_formats(model, tmp_path, calib_text, options, ["dense", "packed"])
    packed = load_state(tmp_path / "packed")
    scale_dtype = {tensor.dtype for name, tensor in packed.items() if name.endswith("weight_scale")}
    assert scale_dtype == {torch.float32 if compute else torch.bfloat16}
    assert main_ok("decompress", "--model", str(tmp_path / "packed"), "--out", str(tmp_path / "packed-dense"))
    assert shard_bytes(tmp_path / "packed-dense") == shard_bytes(tmp_path / "dense")
    assert all(tensor.dtype == torch.bfloat16 for tensor in load_state(tmp_path / "dense").values())
