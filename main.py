"""layerpress command line: compress, evaluate and inspect models that never fit in memory whole."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import torch

from methods import METHODS, Target
from streamer.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, CalibrationOptions
from streamer.errors import LayerpressError

DESCRIPTION = """\
layerpress streams a Hugging Face safetensors checkpoint one transformer block at a time: read a block, run the
calibration activations through it, compress its linear layers, write it to sharded safetensors, move on. Memory
holds one block and the calibration activations, never the whole model. A killed run resumes where it stopped
when the same command is run again.
"""

EPILOG = """\
examples:
  python main.py compress --model IN --out OUT --method sparsegpt --sparsity 0.5
  python main.py compress --model IN --out OUT --method wanda --pattern 2:4
  python main.py gradients --model IN --out GRAD
  python main.py compress --model IN --out OUT --method gblm --gradients GRAD --alpha 100
  python main.py eval --model OUT --windows 32 --seqlen 512
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


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_common(parser: argparse.ArgumentParser, offload: bool = True) -> None:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory (config.json + safetensors)")
    parser.add_argument("--seqlen", type=int, default=2048,
                        help="tokens per window, capped at the model's maximum positions (default: 2048)")
    parser.add_argument("--device", type=parse_device, default=torch.device(default_device),
                        help=f"where blocks run: cpu or cuda (default here: {default_device})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="compute dtype of the blocks (default: the checkpoint's); outputs keep the checkpoint's")
    parser.add_argument("--micro-batch", type=int, default=1,
                        help="windows per block forward (default: 1)")
    if offload:
        parser.add_argument("--offload-activations", type=Path, default=None, metavar="DIR",
                            help="keep the activations in memory-mapped files in DIR instead of RAM")


def add_calibration(parser: argparse.ArgumentParser) -> None:
    """The calibration options, shared by every command that draws calibration windows."""
    parser.add_argument("--calib", default=str(DEFAULT_CALIBRATION),
                        help="calibration text: a file, a saved datasets directory, or a datasets spec "
                        "NAME[:CONFIG[:SPLIT]] (default: the bundled WikiText-2 valid text)")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration window positions (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compress = commands.add_parser(
        "compress", help="prune a checkpoint block by block into a new sharded checkpoint",
        description="Prune every linear layer of every transformer block, streaming one block at a time. "
        "Re-running the same command on a partial output resumes it.",
    )
    add_common(compress)
    compress.add_argument("--out", type=Path, required=True, help="output directory (new, or a partial run's)")
    compress.add_argument("--method", choices=sorted(METHODS), default="sparsegpt",
                          help="; ".join(f"{name}: {cls.summary}" for name, cls in sorted(METHODS.items()))
                          + " (default: sparsegpt)")
    target = compress.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, default=None,
                        help="fraction of each layer's weights to prune, in [0, 1) (default: 0.5)")
    target.add_argument("--pattern", type=parse_pattern, default=None, metavar="N:M",
                        help="semi-structured sparsity: N zeros in every M consecutive weights, e.g. 2:4")
    add_calibration(compress)
    compress.add_argument("--true-sequential", action="store_true",
                          help="observe each group of layers (q/k/v, out, mlp up, mlp down) on inputs that went "
                          "through the already-compressed groups before it")
    compress.add_argument("--max-shard-size", type=parse_size, default="5GB", help="largest output shard, e.g. 5GB, 500MB, 2GiB (default: 5GB)")
    compress.add_argument("--restart", action="store_true", help="discard a partial run in --out and start over")
    method_options = compress.add_argument_group("method options")
    method_options.add_argument("--gradients", type=Path, default=None, metavar="GRAD_DIR",
                                help="gblm: gradient norms written by `main.py gradients` with the same model "
                                "and calibration options")
    for cls in METHODS.values():
        cls.add_arguments(method_options)

    gradients = commands.add_parser(
        "gradients", help="per-weight gradient norms of the LM loss on the calibration windows (for gblm)",
        description="Forward block by block keeping each block's inputs, the loss at the head, then backward "
        "block by block: per weight, the l2 norm over calibration windows of the gradient of each window's mean "
        "token loss, written as safetensors (one file per block) into --out. Activations and gradients live in "
        "memory-mapped files in --out (about blocks x nsamples x seqlen x hidden values of disk at the peak). "
        "Re-running the same command resumes a partial run.",
    )
    add_common(gradients, offload=False)
    gradients.add_argument("--out", type=Path, required=True, help="gradients directory (new, or a partial run's)")
    add_calibration(gradients)
    gradients.add_argument("--restart", action="store_true", help="discard a partial run in --out and start over")

    evaluate = commands.add_parser(
        "eval", help="WikiText-2 perplexity, streamed block by block",
        description="Perplexity = exp(mean token NLL) over non-overlapping windows of the text. The last line "
        'of the output is JSON: {"ppl": ..., "windows": ..., "tokens": ...}.',
    )
    add_common(evaluate)
    evaluate.add_argument("--data", default=str(DEFAULT_EVALUATION),
                          help="evaluation text (default: the bundled WikiText-2 test text)")
    evaluate.add_argument("--windows", type=int, default=None, help="evaluate only the first N windows (default: all)")

    status = commands.add_parser("status", help="how far a run in an output directory got, and what is left")
    status.add_argument("out", type=Path, help="output directory of a compress or gradients run")
    return parser


def make_target(args: argparse.Namespace) -> Target:
    if args.pattern is not None:
        n, m = args.pattern
        if not 0 < n < m:
            raise LayerpressError(f"pattern {n}:{m} is impossible: need 0 < N < M (N zeros in every M weights)")
        return Target(pattern=(n, m))
    sparsity = 0.5 if args.sparsity is None else args.sparsity
    if not 0.0 <= sparsity < 1.0:
        raise LayerpressError(f"sparsity must be in [0, 1), got {sparsity}")
    return Target(sparsity=sparsity)


def check_counts(args: argparse.Namespace) -> None:
    for option in ("seqlen", "micro_batch", "nsamples", "windows"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise LayerpressError(f"--{option.replace('_', '-')} must be at least 1, got {value}")


def stream_options(args: argparse.Namespace):
    from streamer.stream import StreamOptions

    return StreamOptions(device=args.device, micro_batch=args.micro_batch, offload_dir=args.offload_activations)


def calibration_options(args: argparse.Namespace) -> CalibrationOptions:
    return CalibrationOptions(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)


def run_compress(args: argparse.Namespace) -> None:
    from streamer.scheduler import CompressSettings, compress

    try:
        method = METHODS[args.method].from_args(args)
    except ValueError as exc:
        raise LayerpressError(str(exc)) from exc
    settings = CompressSettings(
        model=args.model,
        out=args.out,
        method=method,
        target=make_target(args),
        calibration=calibration_options(args),
        dtype=DTYPES[args.dtype] if args.dtype else None,
        true_sequential=args.true_sequential,
        max_shard_bytes=args.max_shard_size,
        restart=args.restart,
        stream=stream_options(args),
        gradients=args.gradients,
    )
    compress(settings)


def run_gradients(args: argparse.Namespace) -> None:
    from streamer.gradients import GradientSettings, compute_gradients

    compute_gradients(GradientSettings(
        model=args.model,
        out=args.out,
        calibration=calibration_options(args),
        dtype=DTYPES[args.dtype] if args.dtype else None,
        device=args.device,
        micro_batch=args.micro_batch,
        restart=args.restart,
    ))


def run_eval(args: argparse.Namespace) -> None:
    from streamer.evaluate import perplexity

    dtype = DTYPES[args.dtype] if args.dtype else None
    result = perplexity(args.model, args.data, args.seqlen, args.windows, dtype, stream_options(args))
    print(json.dumps(result))


def run_status(args: argparse.Namespace) -> None:
    from streamer.status import describe

    print(describe(args.out))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s layerpress: %(message)s",
        datefmt="%H:%M:%S",
    )
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        check_counts(args)
        commands = {"compress": run_compress, "gradients": run_gradients, "eval": run_eval, "status": run_status}
        commands[args.command](args)
    except LayerpressError as exc:
        print(f"layerpress: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("layerpress: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
