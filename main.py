"""layerpress command line: compress, evaluate and inspect models that never fit in memory whole."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

# Before torch starts CUDA: blocks of different sizes come and go, and expandable segments let the caching
# allocator reuse freed memory across them instead of fragmenting it. A user's own setting wins.
if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

import torch  # noqa: E402

from methods import METHODS, Method, QuantSpec, Target
from methods.quant import ACT_ORDERS, BITS
from methods.reconstruct import Reconstruction
from streamer.block import DEFAULT_EXPERT_MIN_TOKENS
from streamer.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, CalibrationOptions
from streamer.distributed import launched_ranks, leave_world, rank_label, world
from streamer.errors import LayerpressError, RankFollows
from streamer.formats import FORMATS

DESCRIPTION = """\
layerpress streams a Hugging Face safetensors checkpoint one transformer block at a time: read a block, run the
calibration activations through it, compress its linear layers, write it to sharded safetensors, move on. Memory
holds one block and the calibration activations, never the whole model. A killed run resumes where it stopped
when the same command is run again.
"""

EPILOG = """\
examples:
  python main.py plan --model IN --method sparsegpt --nsamples 128 --seqlen 2048 --device-memory 80GiB
  python main.py compress --model IN --out OUT --method sparsegpt --sparsity 0.5
  python main.py compress --model IN --out OUT --method wanda --pattern 2:4
  python main.py compress --model IN --out OUT --method gptq --wbits 4 --groupsize 128
  python main.py compress --model IN --out OUT --method sparsegpt --sparsity 0.7 --wbits 4 --format packed
  python main.py decompress --model OUT --out DENSE_DIR
  python main.py scores --model IN --out SCORES --sparsity 0.7
  python main.py compress --model IN --out OUT --sparsity 0.7 --allocation score --scores SCORES
  python main.py compress --model IN --out OUT --method gptq --bits-policy cmpq --avg-bits 5 --scores SCORES
  python main.py compress --model IN --out OUT --method wanda --sparsity 0.6 --reconstruct biases,norms,masklora
  python main.py compress --model IN --out OUT --method flap --ratio 0.2 --structure AL-AM --metric WIFV
  python main.py gradients --model IN --out GRAD
  python main.py compress --model IN --out OUT --method gblm --gradients GRAD --alpha 100
  python main.py eval --model OUT --windows 32 --seqlen 512
  python main.py eval --model OUT --tasks arc_easy,piqa --output results.json
  python main.py status OUT
"""

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def parse_pattern(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not an N:M pattern: {text!r} (example: 2:4)")
    return int(match.group(1)), int(match.group(2))


def parse_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu or cuda)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("--device cuda asked for, but torch sees no CUDA device")
    return device


COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def compute_dtype(args: argparse.Namespace) -> torch.dtype | None:
    """--dtype as a torch dtype; None: the checkpoint's."""
    return COMPUTE_DTYPES[args.dtype] if args.dtype else None


def add_common(parser: argparse.ArgumentParser, planning: bool = False, offload: bool = True) -> None:
    """Options of every planned command: the model, the windows, where and how blocks run (planning: for `plan`,
    whose --device may name a GPU this machine lacks)."""
    device = torch.device if planning else parse_device
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory (config.json + safetensors)")
    parser.add_argument("--seqlen", type=int, default=2048,
                        help="tokens per window, capped at the model's maximum positions (default: 2048)")
    parser.add_argument("--device", type=device, default=torch.device(default_device),
                        help=f"where blocks run: cpu or cuda (default here: {default_device})")
    parser.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default=None,
                        help="compute dtype of the blocks (default: the checkpoint's); outputs keep the checkpoint's")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="windows per block forward (default: the largest the memory plan fits)")
    if offload:
        parser.add_argument("--offload-activations", type=Path, default=None, metavar="DIR",
                            help="keep the activations in memory-mapped files in DIR instead of RAM (default: on "
                            "the device or in RAM when they fit, else in OUT/.layerpress/activations, or for eval "
                            "a temporary directory)")
    parser.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                        help="read each block only when it is needed, instead of during the previous block "
                        "(saves one block of host RAM)")


def add_planning(parser: argparse.ArgumentParser) -> None:
    """Options of the memory plan, shared by plan and every command it plans."""
    parser.add_argument("--device-memory", type=parse_size, default=None, metavar="SIZE",
                        help="device memory to plan for, e.g. 80GiB (default: the device's total; on a CPU, the "
                        "host memory)")
    parser.add_argument("--host-memory", type=parse_size, default=None, metavar="SIZE",
                        help="host memory to plan for, e.g. 64GiB (default: this machine's total)")
    parser.add_argument("--statistics-per-layer", action="store_true",
                        help="observe one layer at a time, holding one layer's statistics (e.g. Hessian) instead of "
                        "a whole group's; same output, more forwards (default: only when a group's do not fit)")


def add_method(parser: argparse.ArgumentParser) -> None:
    """The method, its target and its own options, of compress (and its plan)."""
    parser.add_argument("--method", choices=sorted(METHODS), default="sparsegpt",
                        help="; ".join(f"{name}: {cls.summary}" for name, cls in sorted(METHODS.items()))
                        + " (default: sparsegpt)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, default=None,
                        help="fraction of each layer's weights to prune, in [0, 1) "
                        "(default: 0.5; 0 for rtn and gptq, which only quantize)")
    target.add_argument("--pattern", type=parse_pattern, default=None, metavar="N:M",
                        help="semi-structured sparsity: N zeros in every M consecutive weights, e.g. 2:4")
    quantization = parser.add_argument_group(
        "quantization (rtn, gptq; sparsegpt prunes and quantizes in one sweep when given --wbits)")
    quantization.add_argument("--wbits", type=int, choices=BITS, default=None, help="bits per weight")
    quantization.add_argument("--groupsize", type=int, default=None,
                              help="input columns sharing one scale (default: one scale per output row)")
    symmetry = quantization.add_mutually_exclusive_group()
    symmetry.add_argument("--sym", dest="symmetric", action="store_true", default=True,
                          help="zero point fixed at the middle of the grid, no stored zero points (default)")
    symmetry.add_argument("--asym", dest="symmetric", action="store_false",
                          help="grid spans [min, max] of each group, with a zero point per group")
    quantization.add_argument("--act-order", nargs="?", const="weight", choices=ACT_ORDERS, default=None,
                              help="gptq, sparsegpt: visit columns by descending Hessian diagonal; groups stay "
                              "contiguous (weight, the default when given bare) or follow the visit order (group: "
                              "stores weight_g_idx, which compressed-tensors >= 0.20 no longer reads)")
    parser.add_argument("--true-sequential", action="store_true",
                        help="observe each group of layers (q/k/v, out, mlp up, mlp down) on inputs that went "
                        "through the already-compressed groups before it")
    add_experts(parser)
    method_options = parser.add_argument_group("method options")
    sharing = {cls.add_arguments.__func__: cls for cls in METHODS.values()}  # sparsegpt and gptq share options
    for cls in sharing.values():
        cls.add_arguments(method_options)


def add_experts(parser: argparse.ArgumentParser) -> None:
    """Mixture-of-experts options, shared by compress and scores (whose scores an allocation matches to layers)."""
    parser.add_argument("--expert-min-tokens", type=int, default=DEFAULT_EXPERT_MIN_TOKENS, metavar="N",
                        help="mixture of experts: an expert the router sends fewer calibration tokens takes its "
                        f"statistics from all of them (the block's output keeps the real routing; default "
                        f"{DEFAULT_EXPERT_MIN_TOKENS}; a number above the calibration tokens: every expert so)")
    parser.add_argument("--compress-router", action="store_true",
                        help="mixture of experts: compress the router too, observed on every token (default: kept "
                        "as it is; dense output only)")


def add_output(parser: argparse.ArgumentParser, max_shard_default: str | None = "5GB") -> None:
    default = "5GB" if max_shard_default else "the compress run's"
    parser.add_argument("--max-shard-size", type=parse_size, default=max_shard_default,
                        help=f"largest output shard, e.g. 5GB, 500MB, 2GiB (default: {default})")
    parser.add_argument("--restart", action="store_true", help="discard a partial run in --out and start over")


def add_calibration(parser: argparse.ArgumentParser) -> None:
    """The calibration options, shared by every command that draws calibration windows."""
    parser.add_argument("--calib", default=str(DEFAULT_CALIBRATION),
                        help="calibration text: a file, a saved datasets directory, or a datasets spec "
                        "NAME[:CONFIG[:SPLIT]] (default: the bundled WikiText-2 valid text)")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration window positions (default: 0)")


def add_allocation(parser: argparse.ArgumentParser) -> None:
    from streamer.allocation import ALLOCATIONS, SCORE_CLUSTERS, SCORE_ESTIMATES

    group = parser.add_argument_group(
        "per-layer sparsity", "how --sparsity is spread over the layers; every allocation keeps the parameter-"
        "weighted mean exactly at --sparsity, each layer within [--min-sparsity, --max-sparsity]",
    )
    group.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                       help="uniform: every layer at --sparsity; score: levels of log10 estimated pruning loss, "
                       "lower-loss levels pruned more (needs --scores); owl: blocks with more outlier Wanda scores "
                       "pruned less (needs --scores); depth: rising linearly with block index (default: uniform)")
    group.add_argument("--scores", type=Path, default=None, metavar="DIR",
                       help="output directory of `main.py scores` on this model (for score and owl)")
    group.add_argument("--min-sparsity", type=float, default=None,
                       help="lowest sparsity of any layer (default: --sparsity minus 0.1)")
    group.add_argument("--max-sparsity", type=float, default=None,
                       help="highest sparsity of any layer (default: --sparsity plus 0.1, below 1)")
    group.add_argument("--levels", type=int, default=3, help="score: number of log-loss levels (default: 3)")
    group.add_argument("--score-estimate", choices=SCORE_ESTIMATES, default="obs_loss",
                       help="score: rank by the SparseGPT sweep's OBS loss (exact reconstruction error), the "
                       "one-shot OBS saliency of the whole matrix, or the OBS loss relative to the layer's output "
                       "energy (default: obs_loss)")
    group.add_argument("--score-clusters", choices=SCORE_CLUSTERS, default="joint",
                       help="score: cluster all layers' losses together (the levels then mostly sort layer types) "
                       "or the layers of each type among themselves (default: joint)")
    group.add_argument("--owl-lambda", type=float, default=0.08,
                       help="owl: sparsities spread over the target plus or minus this (default: 0.08)")


def parse_bit_choices(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted(int(part) for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of bit widths: {text!r} (example: 4,8)") from None


def add_bits_policy(parser: argparse.ArgumentParser) -> None:
    from methods.sensitivity import POLICIES

    group = parser.add_argument_group(
        "per-layer bits (CPTQuant)", "give each layer a bit width from --bit-choices, the most sensitive layers "
        "(by a sensitivity of `main.py scores`, read from --scores) the highest, keeping the parameter-weighted "
        "average at most --avg-bits; replaces --wbits (the grid's other options apply to every layer)",
    )
    group.add_argument("--bits-policy", choices=POLICIES, default=None,
                       help="cmpq (the paper's, as we read it): 1 - mean canonical correlation of the layer's "
                       "block's input and output hidden states; cmpq-noise (ours): of the layer's input and noisy "
                       "output; pmpq: relative "
                       "output error when magnitude-pruned at the score pass's first probe sparsity; tdmpq: "
                       "first-order Taylor output change under input noise scaled to each channel")
    group.add_argument("--avg-bits", type=float, default=None, help="average bits per compressed weight, at most")
    group.add_argument("--bit-choices", type=parse_bit_choices, default=(4, 8), metavar="B1,B2,...",
                       help="the bit widths a layer may get (default: 4,8)")


PLANNED_COMMANDS = ("compress", "scores", "gradients", "eval")


def add_compress_arguments(parser: argparse.ArgumentParser, planning: bool = False) -> None:
    add_common(parser, planning)
    parser.add_argument("--out", type=Path, required=not planning, help="output directory (new, or a partial run's)")
    add_method(parser)
    add_calibration(parser)
    add_output(parser)
    parser.add_argument("--format", choices=sorted(FORMATS), default="dense",
                        help="; ".join(f"{name}: {fmt.summary}" for name, fmt in sorted(FORMATS.items()))
                        + " (default: dense)")
    add_planning(parser)
    add_allocation(parser)
    add_bits_policy(parser)
    parser.add_argument("--gradients", type=Path, default=None, metavar="GRAD_DIR",
                        help="gblm: gradient norms written by `main.py gradients` with the same model and "
                        "calibration options")
    Reconstruction.add_arguments(parser.add_argument_group(
        "reconstruction options",
        "After pruning a block, train a tiny subset of its parameters (AdamW, float32, one micro-batch per step) "
        "so that its outputs match the dense block's, then merge it into the weights (PERP, Zimmer et al. 2023).",
    ))


def add_scores_arguments(parser: argparse.ArgumentParser, planning: bool = False) -> None:
    add_common(parser, planning)
    parser.add_argument("--out", type=Path, required=not planning, help="output directory (new, or a partial run's)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5],
                        help="probe sparsities of the estimates, one or several (default: 0.5)")
    parser.add_argument("--inputs", choices=("dense", "pruned"), default="dense",
                        help="score each block on the dense model's activations, or on those of earlier blocks "
                        "pruned by SparseGPT at the probe sparsity, as sequential pruning sees them (default: dense)")
    parser.add_argument("--outlier-threshold", type=float, default=5.0,
                        help="OWL's M: a Wanda score is an outlier above M times its block's mean (default: 5)")
    parser.add_argument("--cca-noise", type=float, default=0.01,
                        help="cmpq-noise: the output noise its canonical correlations are taken under, relative to the "
                        "layer's mean output variance (default: 0.01)")
    add_experts(parser)
    add_calibration(parser)
    add_planning(parser)
    parser.add_argument("--restart", action="store_true", help="discard a partial run in --out and start over")
    METHODS["sparsegpt"].add_arguments(parser.add_argument_group("OBS options (as sparsegpt's)"))


def add_gradients_arguments(parser: argparse.ArgumentParser, planning: bool = False) -> None:
    add_common(parser, planning, offload=False)
    parser.add_argument("--out", type=Path, required=not planning,
                        help="gradients directory (new, or a partial run's)")
    add_calibration(parser)
    add_planning(parser)
    parser.add_argument("--restart", action="store_true", help="discard a partial run in --out and start over")


def add_eval_arguments(parser: argparse.ArgumentParser, planning: bool = False) -> None:
    add_common(parser, planning)
    parser.add_argument("--data", default=str(DEFAULT_EVALUATION),
                        help="evaluation text (default: the bundled WikiText-2 test text)")
    parser.add_argument("--windows", type=int, default=None, help="evaluate only the first N windows (default: all)")
    add_planning(parser)


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """eval --tasks: lm-evaluation-harness tasks instead of perplexity."""
    tasks = parser.add_argument_group("lm-evaluation-harness tasks")
    tasks.add_argument("--tasks", default=None, help="comma-separated lm-eval task names, e.g. arc_easy,piqa")
    tasks.add_argument("--limit", type=int, default=None, help="the first N documents of each task only")
    tasks.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: "
                       "the task's)")
    tasks.add_argument("--include-path", type=Path, default=None, metavar="DIR",
                       help="a directory of task YAMLs (lm-eval's --include_path)")
    tasks.add_argument("--output", type=Path, default=None, help="write lm-eval's results JSON here")
    tasks.add_argument("--work", type=Path, default=None, metavar="DIR",
                       help="journals and activations of the resumable passes (default: OUTPUT.work beside "
                       "--output; without --output a temporary directory: not resumable)")
    tasks.add_argument("--log-samples", action="store_true", help="keep every request and its answer in --output")
    tasks.add_argument("--bootstrap-iters", type=int, default=100_000,
                       help="bootstrap iterations of the stderr of non-mean metrics (lm-eval's default)")
    tasks.add_argument("--max-length", type=int, default=None,
                       help="tokens a request may have, longer ones lose their first tokens (default: as lm-eval's "
                       "HF backend: the config's maximum positions, else the tokenizer's, else 2048)")
    tasks.add_argument("--restart", action="store_true", help="redo the passes in --work instead of resuming them")


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--speed", type=Path, default=None, metavar="FILE",
                        help="throughput figures (JSON, as --save-speed writes) instead of probing this machine")
    parser.add_argument("--save-speed", type=Path, default=None, metavar="FILE", help="save the probed figures")
    parser.add_argument("--world-size", type=int, default=1, metavar="N",
                        help="plan one rank of a torchrun job of N processes: 1/N of the windows each, compress's "
                        "layer solves shared, statistics and results exchanged (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compress = commands.add_parser(
        "compress", help="prune and/or quantize a checkpoint block by block into a new sharded checkpoint",
        description="Prune and/or quantize every linear layer of every transformer block, streaming one block at a "
        "time (flap: remove whole heads and MLP channels, in a statistics pass then a pruning pass; the smaller "
        "model loads with streamer.model.load_model). Re-running the same command on a partial output resumes it.",
    )
    add_compress_arguments(compress)

    plan = commands.add_parser(
        "plan", help="will a compress, scores, gradients or eval run fit, with which settings, and how long will it "
        "take",
        description="plan COMMAND [that command's options]: predict, from config.json and the shard headers alone, "
        "the peak device and host memory of every phase of that command's run (compress when COMMAND is left out), "
        "the settings that fit (micro-batch, where the activations live, statistics per group or per layer), and "
        "its wall time from this machine's measured throughput (a few seconds of matmul, Cholesky, copy and disk "
        "probes, or figures from --speed). A run that cannot fit is refused with the reason (exit 1). Every command "
        "makes the same plan before it reads a byte.",
    )
    planned = plan.add_subparsers(dest="planned", required=True, metavar="COMMAND")
    for name, add_arguments in (("compress", add_compress_arguments), ("scores", add_scores_arguments),
                                ("gradients", add_gradients_arguments), ("eval", add_eval_arguments)):
        command = planned.add_parser(name, help=f"plan a {name} run (its own options; --out may be left out)")
        add_arguments(command, planning=True)
        add_plan_arguments(command)

    scores = commands.add_parser(
        "scores", help="estimate each linear layer's pruning loss (input of --allocation score and owl)",
        description="Stream the model block by block and write OUT/scores.json: for every linear layer its "
        "parameter count, the OBS loss estimates of pruning it at each probe --sparsity (the SparseGPT sweep's "
        "accumulated loss and the one-shot saliency sum w^2/[U]_qq^2 of the weights the mask removes) and its count "
        "of outlier Wanda scores (OWL). Re-running the same command on a partial output resumes it.",
    )
    add_scores_arguments(scores)

    gradients = commands.add_parser(
        "gradients", help="per-weight gradient norms of the LM loss on the calibration windows (for gblm)",
        description="Forward block by block keeping each block's inputs, the loss at the head, then backward "
        "block by block: per weight, the l2 norm over calibration windows of the gradient of each window's mean "
        "token loss, written as safetensors (one file per block) into --out. Activations and gradients live in "
        "memory-mapped files in --out (about blocks x nsamples x seqlen x hidden values of disk at the peak). "
        "Re-running the same command resumes a partial run.",
    )
    add_gradients_arguments(gradients)

    evaluate = commands.add_parser(
        "eval", help="WikiText-2 perplexity, or lm-evaluation-harness tasks (--tasks), streamed block by block",
        description="Perplexity = exp(mean token NLL) over non-overlapping windows of the text. The last line "
        'of the output is JSON: {"ppl": ..., "windows": ..., "tokens": ...}. With --tasks: lm-eval\'s '
        "log-likelihood tasks (multiple choice, loglikelihood, loglikelihood_rolling), all requests streamed through "
        "block 1, block 2, ...; lm-eval computes the metrics. Needs the eval extra (pip install 'layerpress[eval]'). "
        "A killed task evaluation resumes when the same command is run again.",
    )
    add_eval_arguments(evaluate)
    add_task_arguments(evaluate)

    decompress = commands.add_parser(
        "decompress", help="turn a packed or sparse output back into dense safetensors",
        description="Rebuild the dense weights of a --format packed or sparse output, tensor by tensor, bit for bit "
        "what --format dense writes. Re-running the same command on a partial output resumes it.",
    )
    decompress.add_argument("--model", type=Path, required=True, help="a packed or sparse output directory")
    decompress.add_argument("--out", type=Path, required=True, help="dense output directory (new, or a partial run's)")
    add_output(decompress, max_shard_default=None)

    status = commands.add_parser("status", help="how far a run in an output directory got, and what is left")
    status.add_argument("out", type=Path, help="output directory of a compress, scores or gradients run")
    return parser


def with_planned_command(argv: list[str]) -> list[str]:
    """`plan OPTIONS` as today's `plan compress OPTIONS`: the command may be left out."""
    if argv and argv[0] == "plan" and (len(argv) == 1 or argv[1] not in (*PLANNED_COMMANDS, "-h", "--help")):
        return ["plan", "compress", *argv[1:]]
    return argv


def make_quant(args: argparse.Namespace) -> QuantSpec | None:
    """The grid of every layer (with a bits policy: its widest choice, each layer's own bits set by the policy)."""
    bits = args.wbits
    if getattr(args, "bits_policy", None) is not None:
        if args.wbits is not None:
            raise LayerpressError("--bits-policy chooses each layer's bits from --bit-choices: leave out --wbits")
        bits = max(args.bit_choices)
    if bits is None:
        if args.groupsize is not None or args.act_order is not None or not args.symmetric:
            raise LayerpressError("--groupsize, --asym and --act-order shape a quantization grid: give --wbits too")
        return None
    try:
        return QuantSpec(bits, args.groupsize, args.symmetric, args.act_order)
    except ValueError as exc:
        raise LayerpressError(str(exc)) from exc


def make_target(args: argparse.Namespace) -> Target:
    """The target of every layer; sparsity defaults to 0.5 for methods that prune, 0 for those that only quantize."""
    quant = make_quant(args)
    if args.pattern is not None:
        n, m = args.pattern
        if not 0 < n < m:
            raise LayerpressError(f"pattern {n}:{m} is impossible: need 0 < N < M (N zeros in every M weights)")
        return Target(pattern=(n, m), quant=quant)
    method = METHODS[args.method]
    default = 0.5 if issubclass(method, Method) and method.prunes else 0.0  # structured methods take --ratio
    sparsity = default if args.sparsity is None else args.sparsity
    if not 0.0 <= sparsity < 1.0:
        raise LayerpressError(f"sparsity must be in [0, 1), got {sparsity}")
    return Target(sparsity=sparsity, quant=quant)


def check_counts(args: argparse.Namespace) -> None:
    for option in ("seqlen", "micro_batch", "nsamples", "windows", "limit", "max_length"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise LayerpressError(f"--{option.replace('_', '-')} must be at least 1, got {value}")


def stream_options(args: argparse.Namespace):
    """The stream options as given (micro-batch 1 until the plan fills it in)."""
    from streamer.stream import StreamOptions

    return StreamOptions(
        device=args.device, micro_batch=args.micro_batch or 1, offload_dir=getattr(args, "offload_activations", None),
        prefetch=args.prefetch,
    )


def plan_choices(args: argparse.Namespace):
    """What the user fixed of the memory plan, and the memory it may use."""
    from streamer.commands.planning import PlanChoices

    return PlanChoices(budget=budget(args), micro_batch=args.micro_batch,
                       statistics_per_layer=args.statistics_per_layer)


def make_method(args: argparse.Namespace):
    try:
        return METHODS[args.method].from_args(args)
    except ValueError as exc:
        raise LayerpressError(str(exc)) from exc


def budget(args: argparse.Namespace):
    from streamer.planner import Budget

    return Budget.of_machine(args.device, args.device_memory, args.host_memory)


def calibration_options(args: argparse.Namespace) -> CalibrationOptions:
    return CalibrationOptions(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)


def compress_settings(args: argparse.Namespace):
    """compress's command line as its settings (streamer.commands.compress.CompressSettings)."""
    from streamer.allocation import Allocation, BitsPolicy
    from streamer.commands.compress import CompressSettings

    try:
        reconstruction = Reconstruction.from_args(args)
    except ValueError as exc:
        raise LayerpressError(str(exc)) from exc
    return CompressSettings(
        model=args.model,
        out=args.out,
        method=make_method(args),
        target=make_target(args),
        calibration=calibration_options(args),
        dtype=compute_dtype(args),
        true_sequential=args.true_sequential,
        expert_min_tokens=args.expert_min_tokens,
        compress_router=args.compress_router,
        max_shard_bytes=args.max_shard_size,
        restart=args.restart,
        stream=stream_options(args),
        micro_batch=args.micro_batch,
        statistics_per_layer=args.statistics_per_layer,
        budget=budget(args),
        format=args.format,
        allocation=Allocation(
            kind=args.allocation, min_sparsity=args.min_sparsity, max_sparsity=args.max_sparsity, scores=args.scores,
            levels=args.levels, estimate=args.score_estimate, clusters=args.score_clusters, owl_lambda=args.owl_lambda,
        ),
        reconstruction=reconstruction,
        gradients=args.gradients,
        bits=BitsPolicy(args.bits_policy, args.avg_bits, args.bit_choices, args.scores),
    )


def run_compress(args: argparse.Namespace) -> None:
    from streamer.commands.compress import compress

    compress(compress_settings(args))


def run_plan(args: argparse.Namespace) -> None:
    from streamer.commands.plan import PlanSettings, plan

    result = plan(PlanSettings(
        model=args.model, workload=replace(planned_workload(args), world_size=args.world_size), seqlen=args.seqlen,
        device=args.device,
        budget=budget(args), dtype=compute_dtype(args), true_sequential=getattr(args, "true_sequential", False),
        prefetch=args.prefetch, micro_batch=args.micro_batch,
        offload=getattr(args, "offload_activations", None) is not None,
        statistics_per_layer=args.statistics_per_layer, speed=args.speed, save_speed=args.save_speed,
        evaluation=(args.data, args.windows) if args.planned == "eval" else None,
        compress_router=getattr(args, "compress_router", False),
    ))
    print(result.describe())
    if result.estimate is None:
        print(f"time: no estimate ({args.device.type} is not on this machine: give --speed FILE, measured there)")


def planned_workload(args: argparse.Namespace):
    """The pass `plan COMMAND` plans, from that command's own options (eval's window count is filled in later)."""
    from streamer.planner import Workload

    if args.planned == "compress":
        try:
            reconstruction = Reconstruction.from_args(args)
        except ValueError as exc:
            raise LayerpressError(str(exc)) from exc
        return Workload(make_method(args), make_target(args), args.nsamples, args.seqlen,
                        reconstruction=reconstruction)
    if args.planned == "scores":
        from streamer.commands.scores import ScoreSettings

        settings = ScoreSettings(model=args.model, out=args.out, scorer=make_scorer(args), inputs=args.inputs,
                                 calibration=calibration_options(args), compress_router=args.compress_router)
        return settings.workload(args.seqlen)
    return Workload(None, Target(), getattr(args, "nsamples", 1), args.seqlen, command=args.planned)


def run_decompress(args: argparse.Namespace) -> None:
    from streamer.commands.decompress import decompress

    decompress(args.model, args.out, args.max_shard_size, args.restart)


def make_scorer(args: argparse.Namespace):
    from methods.scores import Scorer

    try:
        return Scorer(tuple(args.sparsity), args.damping, args.blocksize, args.outlier_threshold, args.cca_noise,
                      args.gram_dtype)
    except ValueError as exc:
        raise LayerpressError(str(exc)) from exc


def run_scores(args: argparse.Namespace) -> None:
    from streamer.commands.scores import ScoreSettings, score

    settings = ScoreSettings(
        model=args.model, out=args.out, scorer=make_scorer(args), calibration=calibration_options(args),
        inputs=args.inputs, dtype=compute_dtype(args), restart=args.restart, stream=stream_options(args),
        planning=plan_choices(args), expert_min_tokens=args.expert_min_tokens, compress_router=args.compress_router,
    )
    written = score(settings)
    if world().is_writer:
        print(written)


def run_gradients(args: argparse.Namespace) -> None:
    from streamer.commands.gradients import GradientSettings, compute_gradients

    compute_gradients(GradientSettings(
        model=args.model,
        out=args.out,
        calibration=calibration_options(args),
        dtype=compute_dtype(args),
        device=args.device,
        micro_batch=args.micro_batch,
        restart=args.restart,
        prefetch=args.prefetch,
        planning=plan_choices(args),
    ))


def run_eval(args: argparse.Namespace) -> None:
    if args.tasks is not None:
        run_tasks(args)
        return
    from streamer.commands.evaluate import perplexity

    result = perplexity(args.model, args.data, args.seqlen, args.windows, compute_dtype(args), stream_options(args),
                        plan_choices(args))
    if world().is_writer:  # under torchrun every rank has the result: one prints it
        print(json.dumps(result))


def run_tasks(args: argparse.Namespace) -> None:
    """eval --tasks: lm-eval's tasks on the streamed model; its results table on stdout, its JSON in --output."""
    try:
        from streamer.commands.harness import evaluate_tasks, write_results
    except ModuleNotFoundError as exc:
        raise LayerpressError(f"eval --tasks needs lm-eval ({exc}): pip install 'layerpress[eval]'") from exc
    from lm_eval.utils import make_table

    work = args.work or (args.output.with_name(args.output.name + ".work") if args.output else None)
    results = evaluate_tasks(
        args.model, [task for task in args.tasks.split(",") if task], work, stream_options(args), compute_dtype(args),
        args.limit, args.num_fewshot, args.include_path, args.bootstrap_iters,
        args.max_length, args.restart, plan_choices(args),
    )
    if not world().is_writer:  # under torchrun every rank has the results: one writes and prints them
        return
    if args.output:
        write_results(results, args.output, samples=args.log_samples)
    print(make_table(results))


def run_status(args: argparse.Namespace) -> None:
    from streamer.commands.status import describe

    print(describe(args.out))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(with_planned_command(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s.%(msecs)03d layerpress: %(message)s",
        datefmt="%H:%M:%S",
    )
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        check_counts(args)
        check_torchrun(args)
        commands = {"compress": run_compress, "decompress": run_decompress, "plan": run_plan, "scores": run_scores,
                    "gradients": run_gradients, "eval": run_eval, "status": run_status}
        commands[args.command](args)
    except RankFollows:  # rank 0 reports it
        return 1
    except LayerpressError as exc:
        print(f"layerpress: error: {rank_label()}{exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # under torchrun: a collective failed, its peer dead or silent past the timeout
        if not rank_label():
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"layerpress: error: {rank_label()}a collective failed (another rank died or timed out): {reason}",
              file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:  # outside a block's phases, which name where (streamer/stream.py: Phases)
        from streamer.stream import LOWER_MEMORY

        print(f"layerpress: error: {args.command}: out of device memory: {LOWER_MEMORY}; run the same command to "
              "resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("layerpress: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        leave_world()
    return 0


def check_torchrun(args: argparse.Namespace) -> None:
    """Under torchrun, refuse in one line (rank 0's) what does not run on several ranks yet; nothing changes
    without torchrun."""
    ranks = launched_ranks()
    if ranks == 1:
        return
    unsupported = {
        "decompress": "decompress", "plan": "plan (plan --world-size N predicts a torchrun job)", "status": "status",
    }.get(args.command)
    windows = args.windows if args.command == "eval" else getattr(args, "nsamples", None)
    reason = None
    if unsupported is not None:
        reason = (f"{unsupported} does not run under torchrun ({ranks} processes): run it as one process; compress, "
                  "scores, gradients and eval (perplexity) run data-parallel")
    elif args.command == "eval" and args.tasks is not None and args.work is None and args.output is None:
        reason = ("eval --tasks under torchrun needs --work DIR (or --output FILE) on a filesystem every rank sees: "
                  "the ranks share its passes' journals")
    elif windows is not None and windows < ranks:
        reason = f"{windows} windows cannot be shared by {ranks} ranks: every rank needs at least one"
    if reason is not None:
        raise LayerpressError(reason) if os.environ.get("RANK", "0") == "0" else RankFollows(reason)


def entry_point() -> None:
    """The `layerpress` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
