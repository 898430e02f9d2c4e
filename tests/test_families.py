"""The families people compress today (issue 19): Qwen3, Phi-3, GPT-NeoX/Pythia, Falcon, Gemma 2/3 (text), Mixtral,
Qwen2-MoE and Qwen3-MoE, and one family no adapter declares (Starcoder2, derived from its module tree). Each gets the spine's guarantees; what a
family cannot do is refused in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM, FalconConfig, Gemma2Config, Gemma3TextConfig, GPTNeoXConfig, MixtralConfig, OlmoeConfig,
    Phi3Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig, Starcoder2Config,
)

import main
from methods import METHODS, QuantSpec, Target
from methods.base import Statistic
from methods.flap import Flap
from methods.reconstruct import Reconstruction
from streamer.adapters import adapter_for
from streamer.block import observe
from streamer.checkpoint import Checkpoint
from streamer.commands.evaluate import perplexity
from streamer.data import calibration_windows, evaluation_windows, load_text, load_tokenizer, tokenize
from streamer.experts import LinearRouter
from streamer.model import StagedModel, load_model
from tests.conftest import ROOT, VOCAB, make_tiny_checkpoint
from tests.reference import (
    compress_in_memory, first_block_inputs, in_memory_model, recorded_micro_batch, structured_in_memory,
)
from tests.test_compress import NSAMPLES, SEQLEN, load_state, run_compress
from tests.test_gradients import load_gradients, run_gradients, whole_model_gradient_norms
from tests.test_resume import output_digest
from tests.test_scores import run_scores

LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
NEOX = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            rotary_pct=0.25, max_position_embeddings=256)
FALCON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
# windows of 32 tokens > the sliding window of 8, so sliding layers differ; a cap small enough to change the logits
GEMMA = dict(LLAMA_LIKE, head_dim=16, sliding_window=8, final_logit_softcapping=0.2)
FAMILY_CONFIGS = {
    "qwen3": lambda: Qwen3Config(**LLAMA_LIKE, head_dim=16, tie_word_embeddings=False),
    "phi3": lambda: Phi3Config(**LLAMA_LIKE, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox-parallel": lambda: GPTNeoXConfig(**NEOX, use_parallel_residual=True),
    "gpt_neox-sequential": lambda: GPTNeoXConfig(**NEOX, use_parallel_residual=False),
    "falcon-new-rotary": lambda: FalconConfig(**FALCON, num_kv_heads=2, new_decoder_architecture=True),
    "falcon-old-alibi": lambda: FalconConfig(**FALCON, multi_query=True, parallel_attn=True, alibi=True),
    "gemma2": lambda: Gemma2Config(**GEMMA),
    "gemma3": lambda: Gemma3TextConfig(**GEMMA, layer_types=["sliding_attention", "full_attention"]),
    "starcoder2-derived": lambda: Starcoder2Config(**LLAMA_LIKE, sliding_window=8),
    "mixtral": lambda: MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(**LLAMA_LIKE, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                        num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: Qwen3MoeConfig(**LLAMA_LIKE, head_dim=16, moe_intermediate_size=32, num_experts=4,
                                        num_experts_per_tok=2),
}
FAMILIES = tuple(FAMILY_CONFIGS)
BLOCKS = 2


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory, tokenizer) -> dict:
    """One tiny random checkpoint per family (made lazily: a test of one family makes only its own)."""
    made: dict = {}

    def checkpoint(family: str):
        if family not in made:
            made[family] = make_tiny_checkpoint(family, tmp_path_factory.mktemp(family), tokenizer,
                                                config=FAMILY_CONFIGS[family]())
        return made[family]

    return checkpoint


@pytest.fixture(scope="session")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text((ROOT / "data" / "wikitext2-valid.tokens").read_text(encoding="utf-8")[:50_000])
    return path


def windows_of(model, calib) -> torch.Tensor:
    return calibration_windows(tokenize(load_tokenizer(model), load_text(calib)), NSAMPLES, SEQLEN, 0)


def assert_state_equals(out, expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    """The output's tensors equal the oracle's (both with experts unfused: one linear layer per expert matrix)."""
    streamed = load_model(out, torch.float32).state_dict()
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(streamed[name], tensor, rtol=0, atol=atol, msg=name)


def linear_weights(model) -> list[str]:
    """Checkpoint names of every compressible weight (Mixtral's: block_sparse_moe.experts.E.w1.weight ...)."""
    staged = StagedModel(Checkpoint(model), torch.device("cpu"))
    return [name for index in range(staged.num_blocks) for name in staged.linear_weight_names(index).values()]


@pytest.fixture(scope="module", params=FAMILIES)
def sparse(request, family_checkpoints, calib, tmp_path_factory):
    """Each family compressed once, streamed (sparsegpt 2:4), beside the in-memory oracle's tensors."""
    family = request.param
    model, out = family_checkpoints(family), tmp_path_factory.mktemp(f"{family}-2of4") / "out"
    run_compress(model, out, calib, "--method", "sparsegpt", "--pattern", "2:4")
    expected = compress_in_memory(model, METHODS["sparsegpt"](), Target(pattern=(2, 4)), windows_of(model, calib),
                                  micro_batch=recorded_micro_batch(out))
    return family, model, out, expected


# ---------------------------------------------------------------- every family, the spine's guarantees

def test_streamed_sparsegpt_equals_in_memory(sparse):
    _, _, out, expected = sparse
    assert_state_equals(out, expected)


def test_output_loads_with_from_pretrained_and_gives_the_in_memory_logits(sparse):
    _, model, out, expected = sparse
    oracle = in_memory_model(model)
    oracle.load_state_dict(expected)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 11, 12, 13, 14, 15, 16, 17, 18]])  # longer than the window
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, oracle(ids).logits, rtol=0, atol=1e-5)


def test_two_of_four_holds_in_every_group(sparse):
    _, model, out, _ = sparse
    state = load_state(out)
    weights = linear_weights(model)
    assert len(weights) == BLOCKS * len(adapter_for(json.loads((model / "config.json").read_text())).linear_names)
    for name in weights:
        assert ((state[name].reshape(state[name].shape[0], -1, 4) == 0).sum(dim=-1) >= 2).all(), name


def test_non_block_tensors_are_bit_identical_under_the_checkpoint_names(sparse):
    _, model, out, _ = sparse
    original, compressed = load_state(model), load_state(out)
    assert original.keys() == compressed.keys()  # e.g. GPT-NeoX's head stays `embed_out`, not the model's `lm_head`
    blocks = adapter_for(json.loads((model / "config.json").read_text())).blocks + "."
    outside = [name for name in original if not name.startswith(blocks)]
    assert outside
    for name in outside:
        assert torch.equal(compressed[name], original[name]), name


def test_every_input_byte_is_read_once(sparse):
    _, model, out, _ = sparse
    summary = json.loads((out / ".layerpress" / "journal.json").read_text())["body"]["summary"]
    assert summary["bytes_read"] == sum(entry.nbytes for entry in Checkpoint(model).entries.values())


@pytest.mark.parametrize("family", ["gemma2", "falcon-old-alibi", "starcoder2-derived"])
def test_streamed_eval_gives_the_models_own_perplexity(family_checkpoints, calib, family):
    """The pre-block stage, each block's own call (sliding-window masks) and the final stage (soft-capped logits)
    compute what transformers' forward computes."""
    model = family_checkpoints(family)
    ids = evaluation_windows(tokenize(load_tokenizer(model), load_text(calib)), SEQLEN, 2)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reference(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    streamed = perplexity(model, calib, seqlen=SEQLEN, windows=2)
    assert math.isclose(streamed["ppl"], math.exp(nll.item()), rel_tol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "gpt_neox-parallel"])
def test_streamed_gradients_equal_whole_model_backward(family_checkpoints, calib, tmp_path, family):
    """The backward pass through the soft-capped head and blocks with their own masks (Gemma), and through a head
    the checkpoint names otherwise (GPT-NeoX's embed_out)."""
    model = family_checkpoints(family)
    assert run_gradients(model, tmp_path / "grad", calib) == 0
    expected, streamed = whole_model_gradient_norms(model, windows_of(model, calib)), load_gradients(tmp_path / "grad")
    assert streamed.keys() == expected.keys()
    for name, norms in expected.items():
        torch.testing.assert_close(streamed[name], norms, rtol=1e-5, atol=1e-5 * norms.abs().max().item(), msg=name)


# ---------------------------------------------------------------- other methods, on one family each

@pytest.mark.parametrize("family, options, method, target", [
    ("gemma3", ["--method", "wanda"], "wanda", Target(sparsity=0.5)),
    ("gpt_neox-parallel", ["--method", "gptq", "--wbits", "4", "--groupsize", "16"], "gptq",
     Target(quant=QuantSpec(4, 16, True))),
])
def test_other_methods_stream_as_in_memory(family_checkpoints, calib, tmp_path, family, options, method, target):
    model = family_checkpoints(family)
    run_compress(model, tmp_path / "out", calib, *options)
    expected = compress_in_memory(model, METHODS[method](), target, windows_of(model, calib),
                                  micro_batch=recorded_micro_batch(tmp_path / "out"))
    assert_state_equals(tmp_path / "out", expected)


@pytest.mark.parametrize("sparse", ["gemma3", "falcon-new-rotary", "qwen2_moe"], indirect=True)
def test_a_killed_run_resumes_to_the_same_bytes(calib, tmp_path, sparse):
    _, model, whole, _ = sparse
    argv = ["compress", "--model", str(model), "--out", str(tmp_path / "out"), "--calib", str(calib), "--nsamples",
            str(NSAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu", "--method", "sparsegpt", "--pattern", "2:4"]
    killed = subprocess.run([sys.executable, "main.py", "-q", *argv], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "LAYERPRESS_FAILPOINT": "after-journal:1"})
    assert killed.returncode == -9, killed.stderr
    assert main.main(argv) == 0
    assert output_digest(tmp_path / "out") == output_digest(whole)


# ---------------------------------------------------------------- structured pruning and reconstruction

def run_flap(model, out, calib, *extra: str) -> int:
    return main.main(["compress", "--model", str(model), "--out", str(out), "--calib", str(calib), "--nsamples",
                      str(NSAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu", "--method", "flap", "--ratio", "0.3",
                      *extra])


@pytest.mark.parametrize("family", ["gpt_neox-sequential", "falcon-new-rotary", "qwen3", "gemma2"])
def test_flap_streams_as_in_memory_and_the_smaller_model_computes_the_masked_one(family_checkpoints, calib,
                                                                                 tmp_path, family):
    model, out = family_checkpoints(family), tmp_path / "out"
    assert run_flap(model, out, calib) == 0
    options = ["compress", "--model", "m", "--out", "o", "--ratio", "0.3"]
    method = Flap.from_args(main.build_parser().parse_args(options))
    expected, masked, _ = structured_in_memory(model, method, windows_of(model, calib))
    pruned = load_model(out)
    state = pruned.state_dict()
    for name, tensor in masked.state_dict().items():
        torch.testing.assert_close(state[name], expected.get(name, tensor), rtol=0, atol=1e-6, msg=name)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, masked(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family, reason", [
    ("phi3", "fused qkv_proj and gate_up_proj"),
    ("starcoder2-derived", "derived from the module tree"),
    ("mixtral", "one intermediate width for all experts"),
    ("qwen3_moe", "one intermediate width for all experts"),
])
def test_flap_is_refused_in_one_line_where_channels_cannot_be_cut_whole(family_checkpoints, calib, tmp_path, capsys,
                                                                       family, reason):
    model = family_checkpoints(family)
    capsys.readouterr()  # what making the checkpoint wrote
    assert run_flap(model, tmp_path / "out", calib) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "removed whole" in error and reason in error


@pytest.mark.parametrize("family, subsets", [
    ("falcon-old-alibi", "biases,norms,masklora"), ("gemma2", "biases,norms,masklora"), ("mixtral", "norms,masklora"),
])
def test_streamed_reconstruction_equals_in_memory(family_checkpoints, calib, tmp_path, family, subsets):
    """Falcon's single-norm layout, Gemma's four norms per block and Mixtral's experts are trained; biases where the
    family allows them (Mixtral has no bias flag)."""
    model, out = family_checkpoints(family), tmp_path / "out"
    run_compress(model, out, calib, "--method", "wanda", "--sparsity", "0.6", "--reconstruct", subsets,
                 "--recon-steps", "8", "--recon-lr", "1e-2", "--lora-rank", "4")
    settings = Reconstruction(subsets=tuple(subsets.split(",")), steps=8, lr=1e-2, rank=4)
    expected = compress_in_memory(model, METHODS["wanda"](), Target(sparsity=0.6), windows_of(model, calib),
                                  reconstruction=settings, micro_batch=recorded_micro_batch(out))
    assert_state_equals(out, expected, atol=1e-5)


# ---------------------------------------------------------------- undeclared families

def test_an_undeclared_family_of_the_common_shape_gets_a_derived_adapter(family_checkpoints):
    adapter = adapter_for(json.loads((family_checkpoints("starcoder2-derived") / "config.json").read_text()))
    assert adapter.name == "starcoder2 (derived)" and adapter.blocks == "model.layers"
    assert adapter.linear_names == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.c_fc", "mlp.c_proj")
    assert adapter.norms == ("input_layernorm", "post_attention_layernorm")
    assert adapter.final == ("model.norm", "lm_head")


def test_a_family_it_cannot_derive_is_refused_in_one_line_naming_what_is_missing(tokenizer, tmp_path, calib,
                                                                                 capsys):
    """OLMoE: experts that no adapter declares."""
    config = OlmoeConfig(**LLAMA_LIKE, num_experts=4, num_experts_per_tok=2)
    model = make_tiny_checkpoint("olmoe", tmp_path / "olmoe", tokenizer, config=config)
    assert main.main(["compress", "--model", str(model), "--out", str(tmp_path / "out"), "--calib", str(calib),
                      "--device", "cpu"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # the lines before: saving the tiny checkpoint
    assert error.startswith("layerpress: error: unsupported architecture")
    assert "'olmoe'" in error and "mlp.experts (OlmoeExperts)" in error
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


# ---------------------------------------------------------------- mixture of experts (Mixtral)

class Inputs(Statistic):
    """Keeps every input row it is fed."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def update(self, inputs: torch.Tensor) -> None:
        self.rows.append(inputs.reshape(-1, inputs.shape[-1]))


@pytest.fixture(scope="module")
def mixtral_block(family_checkpoints, calib):
    """Block 0 of tiny Mixtral in memory (experts unfused), its inputs, and each expert's routed token indices."""
    model = in_memory_model(family_checkpoints("mixtral"))
    adapter = adapter_for(model.config.to_dict())
    block = model.get_submodule(adapter.blocks)[0]
    hidden, forward = first_block_inputs(model, windows_of(family_checkpoints("mixtral"), calib))
    hidden = torch.cat(hidden)  # the windows as one batch: token t of the experts' input is row t
    moe_inputs = []
    hook = block.mlp.register_forward_pre_hook(lambda _, args: moe_inputs.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        dense = forward(block, hidden)
    hook.remove()
    _, _, top_k_index = block.mlp.gate(moe_inputs[0])
    routed = {expert: torch.where((top_k_index == expert).any(dim=-1))[0] for expert in range(4)}
    return adapter, block, lambda: forward(block, hidden), moe_inputs[0], routed, dense


def expert_inputs(adapter, block, run, expert: int) -> tuple[torch.Tensor, dict[str, int]]:
    name = f"mlp.experts.{expert}.{adapter.experts.gate}"
    statistic = Inputs()
    with torch.no_grad():
        tokens = observe({name: block.get_submodule(name)}, {name: statistic}, run)
    return torch.cat(statistic.rows), tokens[name]


def test_an_experts_statistics_come_from_exactly_the_tokens_routed_to_it(mixtral_block):
    adapter, block, run, moe_inputs, routed, _ = mixtral_block
    for expert, tokens in routed.items():
        seen, count = expert_inputs(adapter, block, run, expert)
        assert count == tokens.numel() > 0
        torch.testing.assert_close(seen, moe_inputs[tokens], rtol=0, atol=0)


def test_an_expert_observed_on_every_token_keeps_the_blocks_real_routing(mixtral_block):
    """The rule for starved experts: statistics from all tokens, while the block's output is the routed one."""
    adapter, block, run, moe_inputs, _, dense = mixtral_block
    experts = block.get_submodule(adapter.experts.path)
    experts.observe_all = {1}
    try:
        seen, count = expert_inputs(adapter, block, run, 1)
        with torch.no_grad():
            output = run()
    finally:
        experts.observe_all = set()
    assert count == moe_inputs.shape[0]
    torch.testing.assert_close(seen, moe_inputs, rtol=0, atol=0)
    torch.testing.assert_close(output, dense, rtol=0, atol=1e-6)


def test_experts_below_the_token_minimum_are_logged_and_stream_as_in_memory(family_checkpoints, calib, tmp_path,
                                                                            caplog):
    model = family_checkpoints("mixtral")
    with caplog.at_level("INFO", logger="layerpress"):
        run_compress(model, tmp_path / "out", calib, "--method", "sparsegpt", "--expert-min-tokens", "80")
    starved = [record.getMessage() for record in caplog.records if "routed tokens" in record.getMessage()]
    assert starved and all("statistics from all 128 calibration tokens" in line for line in starved)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layerpress"]["expert_min_tokens"] == 80
    expected = compress_in_memory(model, METHODS["sparsegpt"](), Target(sparsity=0.5), windows_of(model, calib),
                                  expert_min_tokens=80, micro_batch=recorded_micro_batch(tmp_path / "out"))
    assert_state_equals(tmp_path / "out", expected)


def test_an_expert_minimum_below_one_token_is_refused(family_checkpoints, calib, tmp_path, capsys):
    model = family_checkpoints("mixtral")
    capsys.readouterr()
    run = ["compress", "--model", str(model), "--out", str(tmp_path / "out"), "--calib", str(calib), "--device", "cpu"]
    assert main.main([*run, "--expert-min-tokens", "0"]) == 1
    assert "--expert-min-tokens must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("sparse, kept", [
    ("mixtral", ("block_sparse_moe.gate.weight",)),
    ("qwen2_moe", ("mlp.gate.weight", "mlp.shared_expert_gate.weight")),  # the shared expert's gate: one output
    ("qwen3_moe", ("mlp.gate.weight",)),
], indirect=["sparse"])
def test_the_router_is_not_compressed(sparse, kept):
    _, model, out, _ = sparse
    original, compressed = load_state(model), load_state(out)
    routers = [name for name in original if name.endswith(kept)]
    assert len(routers) == BLOCKS * len(kept) and all(torch.equal(compressed[name], original[name]) for name in routers)


def test_a_linear_router_routes_as_the_familys_own(mixtral_block):
    _, block, _, moe_inputs, _, _ = mixtral_block
    router = LinearRouter(block.mlp.gate)
    with torch.no_grad():
        for ours, theirs in zip(router(moe_inputs), block.mlp.gate(moe_inputs)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def router_compressed(request, family_checkpoints, calib, tmp_path_factory):
    model = family_checkpoints(request.param)
    out = tmp_path_factory.mktemp(f"{request.param}-router") / "out"
    run_compress(model, out, calib, "--method", "sparsegpt", "--compress-router")
    router = "block_sparse_moe.gate.weight" if request.param == "mixtral" else "mlp.gate.weight"
    return request.param, model, out, router


def test_compress_router_prunes_every_router_and_the_output_loads(router_compressed):
    family, model, out, router = router_compressed
    state, original = load_state(out), load_state(model)
    routers = [name for name in state if name.endswith("." + router)]
    assert len(routers) == BLOCKS
    for name in routers:  # 4 experts x 64 columns: sparsegpt prunes exactly half of each block of columns
        assert int((state[name] == 0).sum()) == 128 and not torch.equal(state[name], original[name])
    if family == "qwen2_moe":  # its shared expert's one-output gate stays as it is
        gates = [name for name in original if name.endswith("shared_expert_gate.weight")]
        assert gates and all(torch.equal(state[name], original[name]) for name in gates)
    assert json.loads((out / "config.json").read_text())["layerpress"]["compress_router"] is True
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(loaded.model.layers[0].mlp.gate.weight, state[routers[0]])


def test_a_compressed_router_is_sparsegpt_on_every_token_of_its_input(mixtral_block, router_compressed):
    """Block 0's router, pruned by an independent SparseGPT call on all the block's MoE inputs (the dense block's,
    as compress observes every layer before any is pruned)."""
    family, _, out, router = router_compressed
    if family != "mixtral":
        pytest.skip("the block fixture is Mixtral's")
    _, block, _, moe_inputs, _, _ = mixtral_block
    layer = torch.nn.Linear(64, 4, bias=False)
    layer.weight.data.copy_(block.mlp.gate.weight)
    method = METHODS["sparsegpt"]()
    statistic = method.statistic(layer)
    statistic.update(moe_inputs)
    expected = method.compress(layer, statistic, Target(sparsity=0.5)).weight
    torch.testing.assert_close(load_state(out)[f"model.layers.0.{router}"], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family, options, message", [
    ("qwen3", (), "--compress-router: qwen3 has no mixture of experts, so no router"),
    ("mixtral", ("--wbits", "4", "--format", "packed"), "--compress-router writes the router dense"),
    ("mixtral", ("--method", "gblm", "--gradients", "GRAD_DIR"), "gblm needs the router's gradient norms"),
])
def test_compress_router_is_refused_in_one_line_where_it_cannot_work(family_checkpoints, calib, tmp_path, capsys,
                                                                    family, options, message):
    model = family_checkpoints(family)
    capsys.readouterr()
    assert main.main(["compress", "--model", str(model), "--out", str(tmp_path / "out"), "--calib", str(calib),
                      "--device", "cpu", "--compress-router", *options]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and message in error


def test_scores_follow_the_starved_expert_rule_and_score_the_router_on_request(family_checkpoints, calib, tmp_path,
                                                                               caplog):
    model = family_checkpoints("mixtral")
    with caplog.at_level("INFO", logger="layerpress"):
        scores = run_scores(model, tmp_path / "scores", calib, "--expert-min-tokens", "80", "--compress-router")
    starved = [record.getMessage() for record in caplog.records if "routed tokens" in record.getMessage()]
    assert starved and all("statistics from all 128 calibration tokens" in line for line in starved)
    assert scores["expert_min_tokens"] == 80 and scores["compress_router"] is True
    assert {f"model.layers.{i}.mlp.gate" for i in range(BLOCKS)} <= set(scores["layers"])
    assert all(math.isfinite(layer["obs_loss"]["0.5"]) for layer in scores["layers"].values())


def test_qwen2_moes_shared_expert_is_compressed_once_beside_each_expert():
    config = FAMILY_CONFIGS["qwen2_moe"]().to_dict()
    names = adapter_for(config).linear_names
    assert names.count("mlp.shared_expert.gate_proj") == 1 and "mlp.experts.3.down_proj" in names
    assert "mlp.shared_expert_gate" not in names and len(names) == 4 + 3 + 3 * 4


def test_blocks_with_and_without_experts_are_refused_in_one_line(tokenizer, tmp_path, calib, capsys):
    config = Qwen3MoeConfig(**LLAMA_LIKE, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                            mlp_only_layers=[1])
    model = make_tiny_checkpoint("qwen3_moe", tmp_path / "mixed", tokenizer, config=config)
    capsys.readouterr()
    assert main.main(["compress", "--model", str(model), "--out", str(tmp_path / "out"), "--calib", str(calib),
                      "--device", "cpu"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "blocks with and without experts (mlp_only_layers [1])" in error
