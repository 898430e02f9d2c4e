"""Full-width block benchmarks: one block of a huge model's width, compressed for real, against the memory plan.

    python tools/bench_fullwidth.py make opt --hidden 9216 --ffn 36864 --out runs/fullwidth/opt-66b-1block
    python tools/bench_fullwidth.py make bloom --hidden 14336 --blocks 70 --shape-only --out runs/fullwidth/bloom-176b
    python tools/bench_fullwidth.py make falcon --hidden 14848 --blocks 80 --vocab 65024 --shape-only \
        --out runs/fullwidth/falcon-180b
    python tools/bench_fullwidth.py make mixtral --hidden 6144 --ffn 16384 --blocks 56 --vocab 32768 --shape-only \
        --out runs/fullwidth/mixtral-8x22b
    python tools/bench_fullwidth.py run runs/fullwidth/opt-66b-1block --nsamples 8 --seqlen 256 --dtype bfloat16
    python tools/bench_fullwidth.py passes runs/fullwidth/opt-66b-1block --dtype bfloat16 [--only scores eval]

`make` saves a random-weight float16 checkpoint with transformers (sharded, a small BPE vocabulary trained on the
bundled text), or with --shape-only only its config and shard headers over sparse files, under the names the hub's
checkpoints use (Mixtral's experts one matrix each): enough for `plan`, which reads nothing else, for models too
large to create (OPT-175B, BLOOM-176B, Falcon-180B: 40B/180B's layout with 8 key/value heads; Mixtral-8x22B: 8
experts, 2 per token).

`run` compresses the checkpoint with SparseGPT 50% in a separate `main.py compress` process at lower priority,
killed if the machine's available memory falls under 3 GiB (the machine is shared), after checking that the
predicted peak is available. It reports the peak RSS of that process (wait4) against the peak the run's own plan
predicted (logged by compress), the wall time, the seconds of each phase (from the run's journal), and the plan's
time estimate for the same run on this machine; results go to OUT/fullwidth.json. `passes` runs every pass that
issue 15 asks to fit (compress with each method and format, reconstruction, flap, scores, gradients, eval) the same
way, each against the plan it logs itself; results go to OUT/passes.json.

The whole model on a GPU, from a shape-only checkpoint and a file of throughput figures for that GPU (measured there
with `main.py plan --save-speed FILE`, or assumed, as tools/speeds/a100-80gb-assumed.json is and says):

    python main.py plan --model runs/fullwidth/opt-175b --method sparsegpt --nsamples 128 --seqlen 2048 \
        --device cuda --device-memory 80GiB --host-memory 64GiB --speed tools/speeds/a100-80gb-assumed.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.bench_stream import journal, phase_shares, predicted_peak, run_measured  # noqa: E402

MIN_AVAILABLE = 3 * 2**30
GiB = 2**30


def model_config(family: str, hidden: int, ffn: int, blocks: int, vocab: int):
    from transformers import BloomConfig, FalconConfig, MixtralConfig, OPTConfig, Qwen3MoeConfig

    heads = hidden // 128
    if family == "falcon":  # Falcon-40B/180B: heads of 64, grouped key/values, two norms, rotary
        if ffn != 4 * hidden:
            sys.exit("falcon's MLP is 4 x hidden wide: leave --ffn out")
        return FalconConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=blocks,
                            num_attention_heads=hidden // 64, num_kv_heads=8, new_decoder_architecture=True,
                            tie_word_embeddings=False, dtype="float16")
    if family == "mixtral":
        return MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=blocks,
                             num_attention_heads=heads, num_key_value_heads=8, num_local_experts=8,
                             num_experts_per_tok=2, tie_word_embeddings=False, dtype="float16")
    if family == "qwen3_moe":  # Qwen3-235B-A22B: 128 experts of --ffn, 8 per token, 64 heads of 128, 4 key/values
        return Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, moe_intermediate_size=ffn,
                              intermediate_size=3 * ffn, num_hidden_layers=blocks, num_attention_heads=64,
                              num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                              tie_word_embeddings=False, dtype="float16")
    if family == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=blocks,
                         num_attention_heads=heads, max_position_embeddings=2048, word_embed_proj_dim=hidden,
                         dtype="float16")
    if ffn != 4 * hidden:
        sys.exit("bloom's MLP is 4 x hidden wide: leave --ffn out")
    return BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=blocks, n_head=heads, dtype="float16")


def make(family: str, hidden: int, ffn: int | None, blocks: int, out: Path, shape_only: bool, vocab: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(family, hidden, ffn or 4 * hidden, blocks, vocab)
    out.mkdir(parents=True, exist_ok=True)
    if shape_only:
        write_shape_only(config, out)
        return
    from tests.conftest import train_tokenizer

    tokenizer = train_tokenizer(out)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(out, max_shard_size="2GB")
    print(f"{out}: {sum(p.stat().st_size for p in out.glob('*.safetensors')) / GiB:.2f} GiB of float16 shards")


def write_shape_only(config, out: Path, max_shard_bytes: int = 5 * 10**9) -> None:
    """config.json and safetensors shards whose headers are real and whose data are holes (sparse files), under
    the checkpoint's names: layerpress's skeleton (experts unfused) with transformers' renaming rules reversed."""
    import torch
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    from streamer.checkpoint import INDEX_FILE
    from streamer.structure import build_skeleton
    from streamer.writer import TensorSpec, encode_header, plan_shards, shard_file_name

    model = build_skeleton(config, torch.float16).model
    saving = [rule.reverse_transform() for rule in get_model_conversion_mapping(model)
              if isinstance(rule, WeightRenaming)][::-1]
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    specs = [TensorSpec(rename_source_key(name, saving, [], reverse=True)[0], tensor.dtype, tuple(tensor.shape))
             for name, tensor in model.state_dict().items() if name not in tied]
    shards = plan_shards(specs, max_shard_bytes)
    weight_map = {}
    for index, group in enumerate(shards):
        name = shard_file_name(index, len(shards))
        header = encode_header(group)
        with open(out / name, "wb") as handle:
            handle.write(header)
            handle.truncate(len(header) + sum(spec.nbytes for spec in group))
        weight_map.update({spec.name: name for spec in group})
    total = sum(spec.nbytes for spec in specs)
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(out)
    print(f"{out}: shape only, {len(shards)} shards of holes, {total / GiB:.0f} GiB as float16")


def run(model: Path, out: Path, nsamples: int, seqlen: int, dtype: str | None, extra: list[str]) -> dict:
    import psutil
    import torch

    from methods import METHODS, Target
    from streamer.checkpoint import Checkpoint
    from streamer.model import StagedModel
    from streamer.planner import Budget, Workload, plan_run, process_baseline

    common = ["--model", str(model), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--device", "cpu",
              "--method", "sparsegpt", "--sparsity", "0.5", *(["--dtype", dtype] if dtype else []), *extra]
    staged = StagedModel(Checkpoint(model), torch.device("cpu"), getattr(torch, dtype) if dtype else None)
    needed = plan_run(staged, Workload(METHODS["sparsegpt"](), Target(sparsity=0.5), nsamples, seqlen), "cpu",
                      Budget.of_machine(torch.device("cpu")), process_baseline("cpu"), prefetch=False).host_peak
    available = psutil.virtual_memory().available
    if available < needed + MIN_AVAILABLE:
        sys.exit(f"not now: the run needs about {needed / GiB:.1f} GiB, {available / GiB:.1f} GiB is available")
    plan = run_measured(["plan", *common, "--no-prefetch"])["output"]
    print(plan, flush=True)
    target = out / f"{model.name}-sparsegpt"
    result = run_measured(["compress", *common, "--out", str(target), "--restart"], niceness=10,
                          min_available=MIN_AVAILABLE)
    body = journal(target)
    predicted = predicted_peak(result["output"])
    measured = result["peak_rss_mib"] * 2**20
    record = {
        "command": "python main.py compress " + " ".join(common),
        "predicted_peak_gib": predicted / GiB,
        "measured_peak_rss_gib": measured / GiB,
        "prediction_error": (predicted - measured) / measured,
        "wall_seconds": result["seconds"],
        "per_block": phase_shares(body),
        "plan": plan,
    }
    print(json.dumps({k: v for k, v in record.items() if k != "plan"}, indent=2))
    return record


# Every pass issue 15 asks to fit, as the command line of one run. Reconstruction trains 4 steps (its peak is the
# same at any number); wanda-reconstruct prunes with wanda before it, so a measurement need not wait for a sweep.
PASSES = {
    "sparsegpt": ["compress", "--method", "sparsegpt", "--sparsity", "0.5"],
    "wanda": ["compress", "--method", "wanda", "--sparsity", "0.5"],
    "gptq-w4-g128-act-order": ["compress", "--method", "gptq", "--wbits", "4", "--groupsize", "128", "--act-order"],
    "sparsegpt-w4-packed": ["compress", "--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "4",
                            "--format", "packed"],
    "sparsegpt-reconstruct": ["compress", "--method", "sparsegpt", "--sparsity", "0.5", "--reconstruct",
                              "biases,norms,masklora", "--recon-steps", "4"],
    "wanda-reconstruct": ["compress", "--method", "wanda", "--sparsity", "0.5", "--reconstruct",
                          "biases,norms,masklora", "--recon-steps", "4"],
    "flap": ["compress", "--method", "flap", "--ratio", "0.2"],
    "scores": ["scores", "--sparsity", "0.7"],
    "gradients": ["gradients"],
    "eval": ["eval"],
}


def run_passes(model: Path, out: Path, nsamples: int, seqlen: int, dtype: str | None, only: list[str]) -> dict:
    """Each pass in its own process at lower priority: the peak its own plan predicted (its log's plan line)
    against the peak RSS it reached."""
    results = {}
    for name in only or PASSES:
        command, *options = PASSES[name]
        calibration = ["--windows", str(nsamples)] if command == "eval" else ["--nsamples", str(nsamples)]
        outputs = [] if command == "eval" else ["--out", str(out / f"{model.name}-{name}"),
                                                "--restart"]
        argv = [command, "--model", str(model), *calibration, "--seqlen", str(seqlen), "--device", "cpu",
                *(["--dtype", dtype] if dtype else []), *options, *outputs]
        result = run_measured(argv, niceness=10, min_available=MIN_AVAILABLE)
        predicted, measured = predicted_peak(result["output"]), result["peak_rss_mib"] * 2**20
        results[name] = {
            "command": "python main.py " + " ".join(argv),
            "predicted_peak_gib": predicted / GiB,
            "measured_peak_rss_gib": measured / GiB,
            "prediction_error": (predicted - measured) / measured,
            "wall_seconds": result["seconds"],
        }
        print(f"{name:24s} planned {predicted / GiB:7.2f} GiB  measured {measured / GiB:7.2f} GiB  "
              f"({(predicted - measured) / measured:+.1%})  {result['seconds']:.0f} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    making = commands.add_parser("make", help="save a random-weight (or shape-only) checkpoint")
    making.add_argument("family", choices=("opt", "bloom", "falcon", "mixtral", "qwen3_moe"))
    making.add_argument("--hidden", type=int, required=True)
    making.add_argument("--ffn", type=int, default=None, help="MLP width (default: 4 x hidden)")
    making.add_argument("--blocks", type=int, default=1)
    making.add_argument("--vocab", type=int, default=50272, help="vocabulary of a shape-only checkpoint")
    making.add_argument("--shape-only", action="store_true", help="headers over sparse files: for plan only")
    making.add_argument("--out", type=Path, required=True)
    running = commands.add_parser("run", help="compress one checkpoint, measured, against its plan")
    running.add_argument("model", type=Path)
    running.add_argument("--nsamples", type=int, default=8)
    running.add_argument("--seqlen", type=int, default=256)
    running.add_argument("--dtype", default=None, help="compute dtype (float16 matmuls crawl on most CPUs)")
    running.add_argument("--out", type=Path, default=ROOT / "runs" / "fullwidth")
    running.add_argument("extra", nargs="*", help="more compress options, after --")
    passes = commands.add_parser("passes", help="every pass of issue 15 on one checkpoint, measured against its plan")
    passes.add_argument("model", type=Path)
    passes.add_argument("--nsamples", type=int, default=8)
    passes.add_argument("--seqlen", type=int, default=256)
    passes.add_argument("--dtype", default=None)
    passes.add_argument("--only", nargs="*", choices=sorted(PASSES), default=[], help="these passes (default: all)")
    passes.add_argument("--out", type=Path, default=ROOT / "runs" / "fullwidth")
    args = parser.parse_args()
    if args.command == "passes":
        args.out.mkdir(parents=True, exist_ok=True)
        results = run_passes(args.model, args.out, args.nsamples, args.seqlen, args.dtype, args.only)
        results_file = args.out / "passes.json"
        previous = json.loads(results_file.read_text()) if results_file.is_file() else {}
        previous.setdefault(args.model.name, {}).update(results)
        results_file.write_text(json.dumps(previous, indent=2))
        return
    if args.command == "make":
        make(args.family, args.hidden, args.ffn, args.blocks, args.out, args.shape_only, args.vocab)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    record = run(args.model, args.out, args.nsamples, args.seqlen, args.dtype, args.extra)
    results_file = args.out / "fullwidth.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results[args.model.name] = record
    results_file.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
