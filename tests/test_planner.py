"""The memory plan: predictions that depend on width and calibration, never depth; settings that fit; refusals;
and compress runs whose plan-chosen settings give the same bytes as the same settings given explicitly."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import main
from methods import METHODS, Target
from methods.quant import QuantSpec
from methods.statistics import Gram
from streamer import planner as planner_module
from streamer.commands.compress import compress
from streamer.activations import ActivationBuffer, Activations
from streamer.checkpoint import Checkpoint
from streamer.errors import LayerpressError
from streamer.model import StagedModel
from streamer.planner import KEPT_RESULTS, Budget, Choice, ModelShapes, Planner, Speed, Workload
from tests.conftest import TINY_CONFIGS
from tests.test_resume import output_digest

PROCESS = 300 * 2**20  # a fixed process size, so that predictions do not follow this test process's RSS
BIG = 2**40


def shapes_of(model_dir, true_sequential: bool = False) -> ModelShapes:
    return ModelShapes.of(StagedModel(Checkpoint(model_dir), torch.device("cpu")), true_sequential)


def make_planner(model_dir, device_type="cuda", budget=Budget(BIG, BIG), nsamples=16, seqlen=256,
                 method="sparsegpt", **options) -> Planner:
    workload = Workload(METHODS[method](), Target(sparsity=0.5), nsamples, seqlen)
    return Planner(shapes_of(model_dir), workload, device_type, budget, PROCESS, **options)


def peaks(planner: Planner, choice: Choice) -> list[tuple[str, int, int]]:
    return [(phase.name, phase.device_peak, phase.host_peak) for phase in planner.phases(choice)]


def test_a_deeper_model_of_the_same_width_has_the_same_peaks(tiny_checkpoints, tokenizer, tmp_path):
    deeper = tmp_path / "deeper-opt"
    config = TINY_CONFIGS["opt"]()
    config.num_hidden_layers *= 2
    AutoModelForCausalLM.from_config(config).save_pretrained(deeper, max_shard_size="40KB")
    shallow, deep = make_planner(tiny_checkpoints["opt"]), make_planner(deeper)
    assert deep.shapes.blocks == 2 * shallow.shapes.blocks
    for device_type in ("cpu", "cuda"):
        for choice in (Choice(4, "device", False), Choice(1, "host", True), Choice(2, "disk", False)):
            if device_type == "cpu" and choice.activations == "device":
                continue
            shallow.device_type = deep.device_type = device_type
            assert peaks(shallow, choice) == peaks(deep, choice)


def test_statistic_sizes_are_the_real_statistics(tiny_checkpoints):
    planner = make_planner(tiny_checkpoints["llama"])
    staged = StagedModel(Checkpoint(tiny_checkpoints["llama"]), torch.device("cpu"))
    staged.load_block(0)
    for name, layer in staged.linears(staged.blocks[0]).items():
        assert planner.layers[name].statistic == Gram(layer).nbytes == 4 * layer.in_features**2


@pytest.mark.parametrize("method, target", [
    ("sparsegpt", Target(sparsity=0.5)),
    ("sparsegpt", Target(sparsity=0.5, quant=QuantSpec(4, 32))),
    ("gptq", Target(quant=QuantSpec(4, 32))),
    ("rtn", Target(quant=QuantSpec(4))),
    ("wanda", Target(sparsity=0.5)),
    ("magnitude", Target(sparsity=0.5)),
])
def test_the_write_phase_counts_the_masks_and_grids_the_results_keep(tiny_checkpoints, method, target):
    """Each layer's result keeps its mask and grid record until the block is written: the plan holds their size."""
    workload = Workload(METHODS[method](), target, 4, 32)
    planner = Planner(shapes_of(tiny_checkpoints["llama"]), workload, "cpu", Budget(BIG, BIG), PROCESS)
    write = next(phase for phase in planner.phases(Choice(1, "host", False)) if phase.name == "write")
    staged = StagedModel(Checkpoint(tiny_checkpoints["llama"]), torch.device("cpu"))
    staged.load_block(0)
    kept = 0
    for layer in staged.linears(staged.blocks[0]).values():
        statistic = workload.method.statistic(layer)
        if statistic is not None:
            statistic.update(torch.randn(32, layer.in_features))
        result = workload.method.compress(layer, statistic, target)
        parts = [result.mask, *(vars(result.quant).values() if result.quant is not None else ())]
        kept += sum(part.nbytes for part in parts if isinstance(part, torch.Tensor))
    assert write.host[KEPT_RESULTS] == kept


def test_more_calibration_needs_more_memory_and_a_wider_model_too(tiny_checkpoints):
    small = make_planner(tiny_checkpoints["llama"], nsamples=8)
    large = make_planner(tiny_checkpoints["llama"], nsamples=64)
    choice = Choice(1, "device", False)
    assert all(a[1] < b[1] for a, b in zip(peaks(small, choice), peaks(large, choice)))
    assert large.activation_buffer_bytes() == 64 * 256 * 64 * 4


def test_the_chosen_micro_batch_fits_and_the_next_larger_does_not(tiny_checkpoints):
    roomy = make_planner(tiny_checkpoints["llama"])
    four = roomy.phases(Choice(4, "device", False))
    device = int(max(p.device_peak for p in four) / (1 - planner_module.DEVICE_MARGIN)) + 1
    planner = make_planner(tiny_checkpoints["llama"], budget=Budget(device, BIG))
    plan = planner.choose()
    assert plan.choice == Choice(4, "device", False)
    assert planner.shortfall(plan.phases) is None
    assert "needs" in planner.shortfall(planner.phases(Choice(8, "device", False)))
    with pytest.raises(LayerpressError, match="cannot fit.*micro-batch 16"):  # an explicit micro-batch is kept
        planner.choose(micro_batch=16)


def test_activations_move_to_the_host_then_to_disk_as_memory_shrinks(tiny_checkpoints):
    roomy = make_planner(tiny_checkpoints["llama"])
    on_device = max(p.device_peak for p in roomy.phases(Choice(1, "device", False)))
    off_device = max(p.device_peak for p in roomy.phases(Choice(1, "host", False)))
    device = int((on_device + off_device) / 2 / (1 - planner_module.DEVICE_MARGIN))
    assert make_planner(tiny_checkpoints["llama"], budget=Budget(device, BIG)).choose().choice.activations == "host"
    in_ram = max(p.host_peak for p in roomy.phases(Choice(1, "host", False)))
    tight = make_planner(tiny_checkpoints["llama"], budget=Budget(device, in_ram - 1))
    assert tight.choose().choice.activations == "disk"


def test_statistics_go_one_layer_at_a_time_when_a_groups_do_not_fit(tiny_checkpoints):
    roomy = make_planner(tiny_checkpoints["llama"], device_type="cpu")
    group = max(p.host_peak for p in roomy.phases(Choice(1, "disk", False)))
    per_layer = max(p.host_peak for p in roomy.phases(Choice(1, "disk", True)))
    assert per_layer < group
    planner = make_planner(tiny_checkpoints["llama"], device_type="cpu", budget=Budget(0, per_layer))
    assert planner.choose().choice == Choice(1, "disk", True)
    with pytest.raises(LayerpressError, match="cannot fit: .* needs .* of host memory"):
        make_planner(tiny_checkpoints["llama"], device_type="cpu", budget=Budget(0, per_layer - 1)).choose()


def test_on_a_cpu_device_and_host_are_one_pool(tiny_checkpoints):
    planner = make_planner(tiny_checkpoints["opt"], device_type="cpu")
    assert planner.candidates(None, None, None)[0] == Choice(8, "host", False)  # 8 x 256 tokens a forward
    for phase in planner.phases(Choice(1, "host", False)):
        assert phase.device_peak == 0 and phase.host_peak > PROCESS


def test_plan_command_prints_every_phase_and_refuses_what_cannot_fit(tiny_checkpoints, tmp_path, capsys):
    speed = tmp_path / "speed.json"
    Speed(1e11, 5e10, 2e10, 1e-5, 1e10, 1e9, 5e8, how="figures for the test").save(speed)
    model = str(tiny_checkpoints["bloom"])
    assert main.main(["plan", "--model", model, "--nsamples", "8", "--seqlen", "64", "--device", "cuda",
                      "--device-memory", "4GiB", "--host-memory", "8GiB", "--speed", str(speed)]) == 0
    out = capsys.readouterr().out
    for phase in ("embed", "read", "observe", "compress", "write", "propagate", "eval head"):
        assert f"\n{phase} " in out
    assert "settings that fit: micro-batch 8, activations on the cuda" in out
    assert "time: about" in out and "figures for the test" in out
    assert main.main(["plan", "--model", model, "--device", "cuda", "--device-memory", "4GiB"]) == 0
    assert "no estimate" in capsys.readouterr().out
    assert main.main(["plan", "--model", model, "--device", "cpu", "--host-memory", "10MiB"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("layerpress: error: the run cannot fit") and "\n" not in error


def compress_argv(model, out, calib, *extra: str) -> list[str]:
    return ["compress", "--model", str(model), "--out", str(out), "--calib", str(calib), "--nsamples", "4",
            "--seqlen", "32", "--device", "cpu", "--method", "sparsegpt", *extra]


def host_peak(planner: Planner, choice: Choice) -> int:
    return max(phase.host_peak for phase in planner.phases(choice) if phase.required)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_plan_chosen_settings_give_the_bytes_of_the_same_settings_given_explicitly(
    tiny_checkpoints, tmp_path, calib_text, caplog, family
):
    model = tiny_checkpoints[family]
    planner = make_planner(model, device_type="cpu", nsamples=4, seqlen=32, prefetch=True)
    tightest = host_peak(planner, Choice(1, "disk", True))
    assert all(host_peak(planner, choice) > tightest for choice in planner.candidates(None, None, None)[:-1])
    argv = compress_argv(model, tmp_path / "planned", calib_text, "--host-memory", f"{tightest}B")
    with caplog.at_level(logging.INFO, logger="layerpress"):  # planned for this process size, as the test's plan
        compress(dataclasses.replace(main.compress_settings(main.build_parser().parse_args(argv)),
                                     process_bytes=PROCESS))
    assert "plan of compress: micro-batch 1, activations offloaded to disk, statistics one layer at a time" in caplog.text
    assert (tmp_path / "planned" / ".layerpress" / "activations").is_dir()
    explicit = ["--micro-batch", "1", "--offload-activations", str(tmp_path / "acts"), "--statistics-per-layer"]
    assert main.main(compress_argv(model, tmp_path / "explicit", calib_text, *explicit)) == 0
    # the same micro-batch: a bigger one sums in another order (the CPU plan's default here is 4)
    assert main.main(compress_argv(model, tmp_path / "default", calib_text, "--micro-batch", "1")) == 0
    digests = {name: output_digest(tmp_path / name) for name in ("planned", "explicit", "default")}
    assert digests["planned"] == digests["explicit"] == digests["default"], "per-layer statistics change nothing"
    record = json.loads((tmp_path / "planned" / "config.json").read_text())["layerpress"]
    assert record["micro_batch"] == 1


def test_per_layer_statistics_equal_group_statistics_with_true_sequential(tiny_checkpoints, tmp_path, calib_text):
    model = tiny_checkpoints["llama"]
    for name, extra in (("group", []), ("layer", ["--statistics-per-layer"])):
        assert main.main(compress_argv(model, tmp_path / name, calib_text, "--true-sequential", *extra)) == 0
    assert output_digest(tmp_path / "group") == output_digest(tmp_path / "layer")


def test_activations_on_the_device_are_never_copied_to_the_host():
    """On the meta device any copy to the host raises, so a full propagate pass proves none happens."""
    acts = Activations(4, 8, 16, torch.float32, micro_batch=2, device=torch.device("meta"))
    assert acts.inputs.data.device.type == acts.outputs.data.device.type == "meta"
    acts.run(lambda hidden: hidden * 2, torch.device("meta"))
    acts.swap()
    assert acts.inputs.data.device.type == "meta"


def test_buffers_are_saved_and_loaded_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr("streamer.activations.CHUNK", 1000)  # many chunks, one split across the halves
    source = ActivationBuffer((3, 7, 11), torch.bfloat16)
    source.data.copy_(torch.randn(3, 7, 11))
    source.save(tmp_path / "inputs.bin")
    assert (tmp_path / "inputs.bin").stat().st_size == source.data.nbytes
    copy = ActivationBuffer((3, 7, 11), torch.bfloat16, device=torch.device("cpu"))
    copy.load(tmp_path / "inputs.bin")
    assert torch.equal(copy.data, source.data)


def test_the_time_estimate_counts_each_gram_once_at_its_precisions_rate(tiny_checkpoints):
    """A Gram's accumulation is timed once per distinct input, at the rate of its gram_dtype (and a bfloat16
    Gram's chunk traffic at the bandwidth); a float32 forward at the float32 rate."""
    speed = Speed(1e12, 1e11, 2e10, 1e-5, 1e10, 1e9, 5e8, matmul_tf32=4e11, matmul_bf16=8e11)
    choice = Choice(1, "host", False)
    tokens, staged = 16 * 256, StagedModel(Checkpoint(tiny_checkpoints["llama"]), torch.device("cpu"))
    linears = staged.linears(staged.blocks[0])
    inputs = [linears[readers[0]].in_features for readers in staged.adapter.by_input(staged.adapter.linear_names)]
    assert len(inputs) == 4  # q/k/v, o, gate/up, down

    def compute(gram_dtype: str) -> float:
        workload = Workload(METHODS["sparsegpt"](gram_dtype=gram_dtype), Target(sparsity=0.5), 16, 256)
        planner = Planner(shapes_of(tiny_checkpoints["llama"]), workload, "cuda", Budget(BIG, BIG), PROCESS)
        return planner_module.estimate_time(planner, choice, speed).compute

    flops = sum(2.0 * tokens * n * n for n in inputs)
    moved = sum(12.0 * tokens * n * n / Gram.BF16_CHUNK for n in inputs)
    assert compute("float32") - compute("tf32") == pytest.approx(flops / 1e11 - flops / 4e11)
    assert compute("float32") - compute("bfloat16") == pytest.approx(flops / 1e11 - flops / 8e11 - moved / 1e10)
    assert speed.forward_rate(torch.float32) == 1e11 and speed.forward_rate(torch.bfloat16) == 1e12
    assert Speed(1e12, 1e11, 2e10, 1e-5, 1e10, 1e9, 5e8).statistic_rate("bfloat16") == 1e11  # not assumed


def test_the_plan_says_in_what_precision_the_statistics_multiply(tiny_checkpoints):
    """--gram-dtype auto resolves by the blocks' dtype; the plan names the result where it is not float32."""
    staged = StagedModel(Checkpoint(tiny_checkpoints["llama"]), torch.device("cpu"), dtype=torch.bfloat16)

    def settings_line(method: str, **options) -> str:
        workload = Workload(METHODS[method](**options), Target(sparsity=0.5), 16, 256)
        plan = planner_module.plan_run(staged, workload, "cuda", Budget(BIG, BIG), PROCESS)
        return next(line for line in plan.describe().splitlines() if line.startswith("settings that fit"))

    assert settings_line("sparsegpt").endswith("(the statistics' products in tf32)")
    assert settings_line("sparsegpt", gram_dtype="bfloat16").endswith("(the statistics' products in bfloat16)")
    assert "products" not in settings_line("sparsegpt", gram_dtype="float32")
    assert "products" not in settings_line("wanda")
