"""One statistic per distinct input: layers that read one tensor (q/k/v, gate/up) share the statistic of methods
whose statistic is the input's, with bit-identical results and less observe memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods import METHODS, Method
from methods.base import Statistic, Target
from methods.scores import Scorer
from methods.statistics import Gram
from streamer.block import observe
from streamer.errors import LayerpressError
from streamer.checkpoint import Checkpoint
from streamer.model import StagedModel
from streamer.planner import Budget, ModelShapes, Planner, Workload
from tests.test_compress import load_state, run_compress
from tests.test_scores import run_scores

GiB = 2**30
DISTINCT_INPUTS = {"llama": 4, "opt": 4}  # q/k/v, o, gate/up, down; q/k/v, out, fc1, fc2
LAYERS = {"llama": 7, "opt": 6}
BLOCKS = 3


def compress_counting(model, out, calib, monkeypatch, method: str, *extra: str, share: bool = True) -> int:
    """Compress; returns how many statistics the method made for real layers, not the plan's on the meta device
    (`share` is the switch that turns sharing off)."""
    cls = METHODS[method]
    made = []
    statistic = cls.statistic

    def counted(self, layer, **precomputed):
        made.extend([layer] if layer.weight.device.type != "meta" else [])
        return statistic(self, layer, **precomputed)

    monkeypatch.setattr(cls, "statistic", counted)
    monkeypatch.setattr(cls, "statistic_per_input", share)
    run_compress(model, out, calib, "--method", method, *extra)
    monkeypatch.undo()
    return len(made)


@pytest.mark.parametrize("family, method, options", [
    *((family, method, options) for family in ("opt", "llama") for method, options in (
        ("sparsegpt", ()), ("gptq", ("--wbits", "4", "--groupsize", "16", "--act-order")), ("wanda", ()))),
    ("llama", "sparsegpt", ("--statistics-per-layer",)), ("llama", "sparsegpt", ("--true-sequential",)),
])
def test_shared_statistics_give_the_bytes_of_separate_ones(tiny_checkpoints, tmp_path, calib_text, monkeypatch,
                                                           family, method, options):
    model = tiny_checkpoints[family]
    shared = compress_counting(model, tmp_path / "shared", calib_text, monkeypatch, method, *options)
    separate = compress_counting(model, tmp_path / "separate", calib_text, monkeypatch, method, *options,
                                 share=False)
    assert (shared, separate) == (BLOCKS * DISTINCT_INPUTS[family], BLOCKS * LAYERS[family])
    ours, theirs = load_state(tmp_path / "shared"), load_state(tmp_path / "separate")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


class Rows(Statistic):
    def __init__(self) -> None:
        self.updates = 0

    def update(self, inputs: torch.Tensor) -> None:
        self.updates += 1


def test_a_shared_statistic_is_fed_once_and_a_wrong_declaration_is_refused():
    linears = {name: nn.Linear(4, 4) for name in "abc"}
    shared = Rows()
    batches = [torch.randn(2, 4) for _ in range(3)]

    def same_input() -> None:
        for x in batches:
            linears["a"](x), linears["b"](x), linears["c"](x + 1)

    statistics = {"a": shared, "b": shared, "c": Rows()}
    tokens = observe(linears, statistics, same_input)
    assert (shared.updates, statistics["c"].updates) == (3, 3)
    assert tokens == {"a": 6, "b": 6, "c": 6}
    with pytest.raises(LayerpressError, match="a, b are declared to read one input, but b was called with another"):
        observe(linears, {"a": shared, "b": shared}, lambda: [(linears["a"](x), linears["b"](x.clone()))
                                                                for x in batches])


def statistics_bytes(model, method: Method, share: bool, monkeypatch, per_layer: bool = False) -> int:
    monkeypatch.setattr(type(method), "statistic_per_input", share)
    staged = StagedModel(Checkpoint(model), torch.device("cpu"))
    planner = Planner(ModelShapes.of(staged), Workload(method, Target(sparsity=0.5), 4, 32), "cpu",
                      Budget(device=64 * GiB, host=64 * GiB), process_bytes=0)
    choice = planner.choose(micro_batch=1, per_layer_statistics=per_layer).choice
    return next(p for p in planner.phases(choice) if p.name == "observe").host["statistics"]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_the_plan_observes_one_statistic_per_distinct_input(tiny_checkpoints, monkeypatch, family):
    model, method = tiny_checkpoints[family], METHODS["sparsegpt"]()
    staged = StagedModel(Checkpoint(model), torch.device("cpu"))
    linears = staged.linears(staged.blocks[0])
    gram = {name: Gram(layer).nbytes for name, layer in linears.items()}
    distinct = {readers[0] for readers in staged.adapter.by_input(staged.adapter.linear_names)}
    assert len(distinct) == DISTINCT_INPUTS[family]
    assert statistics_bytes(model, method, True, monkeypatch) == sum(gram[name] for name in distinct)
    assert statistics_bytes(model, method, False, monkeypatch) == sum(gram.values())


def test_the_score_pass_shares_grams_with_the_scores_of_separate_ones(tiny_checkpoints, tmp_path, calib_text,
                                                                      monkeypatch):
    model = tiny_checkpoints["llama"]
    shared = run_scores(model, tmp_path / "shared", calib_text, "--statistics-per-layer")
    monkeypatch.setattr(Scorer, "statistic_per_input", False)
    separate = run_scores(model, tmp_path / "separate", calib_text, "--statistics-per-layer")
    assert shared["layers"] == separate["layers"]
