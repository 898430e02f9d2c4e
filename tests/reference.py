"""An in-memory oracle: the same compression algorithm run on the whole model, loaded by transformers.

It does what the reference implementations (SparseGPT's and Wanda's scripts) do: load the full model, catch the
first block's inputs and call arguments from the model's own forward, then walk the blocks in memory. Streaming
must give the same tensors. With a reconstruction, each block is also trained towards its dense outputs (as PERP's
layer-wise reconstruction does it in memory), with the seeds the streaming run uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from methods import Method, Target
from methods.reconstruct import Reconstruction, reconstruct
from streamer.adapters import adapter_for
from streamer.scheduler import block_seed


class _Stop(Exception):
    pass


def first_block_inputs(
    model: nn.Module, windows: torch.Tensor
) -> tuple[list[torch.Tensor], Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """The first block's inputs for each window, and a function that calls any block the way the model does."""
    blocks = model.get_submodule(adapter_for(model.config.to_dict()).blocks)
    captured: list[tuple[torch.Tensor, tuple, dict]] = []

    def catch(module, args, kwargs):
        captured.append((args[0], args[1:], kwargs))
        raise _Stop

    hook = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for window in windows:
            try:
                model(window.unsqueeze(0), use_cache=False)
            except _Stop:
                pass
    hook.remove()
    _, args, kwargs = captured[0]

    def forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = block(x, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return [h for h, _, _ in captured], forward


def load_with_biases(model_dir: Path) -> AutoModelForCausalLM:
    """The model with every bias its family's config flags allow; the ones the checkpoint lacks set to zero."""
    config = AutoConfig.from_pretrained(model_dir)
    adapter = adapter_for(config.to_dict())
    for flag in adapter.bias_flags:
        if hasattr(config, flag):
            setattr(config, flag, True)
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, dtype=torch.float32, output_loading_info=True
    )
    with torch.no_grad():
        for name in info["missing_keys"]:
            model.get_parameter(name).zero_()
    return model


def compress_in_memory(
    model_dir: Path,
    method: Method,
    target: Target,
    windows: torch.Tensor,
    true_sequential: bool = False,
    reconstruction: Reconstruction | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    reconstruction = reconstruction or Reconstruction()
    if "biases" in reconstruction.subsets:
        model = load_with_biases(model_dir).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    adapter = adapter_for(model.config.to_dict())
    blocks = model.get_submodule(adapter.blocks)
    hidden, forward = first_block_inputs(model, windows)
    groups = list(adapter.sequential_groups) if true_sequential else [adapter.linear_names]
    for index, block in enumerate(blocks):
        with torch.no_grad():
            dense = [forward(block, x) for x in hidden] if reconstruction.enabled else []
            linears = {name: block.get_submodule(name) for name in adapter.linear_names}
            for group in groups:
                stats = {name: method.statistic(linears[name]) for name in group}
                hooks = [
                    linears[name].register_forward_pre_hook(lambda _, a, s=s: s.update(a[0]))
                    for name, s in stats.items()
                    if s is not None
                ]
                if hooks:
                    for x in hidden:
                        forward(block, x)
                for h in hooks:
                    h.remove()
                for name in group:
                    result = method.compress(linears[name], stats[name], target)
                    linears[name].weight.copy_(result.weight)
        if reconstruction.enabled:
            norms = {name: block.get_submodule(name) for name in adapter.norms}
            generator = torch.Generator().manual_seed(block_seed(seed, index))
            batches = list(zip(hidden, dense))
            reconstruct(block, linears, norms, lambda x: forward(block, x), batches, reconstruction, generator)
        with torch.no_grad():
            hidden = [forward(block, x) for x in hidden]
    return model.state_dict()
