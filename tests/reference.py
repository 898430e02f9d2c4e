"""An in-memory oracle: the same compression algorithm run on the whole model, loaded by transformers.

It does what the reference implementations (SparseGPT's and Wanda's scripts) do: load the full model, catch the
first block's inputs and call arguments from the model's own forward, then walk the blocks in memory. Streaming
must give the same tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from methods import Method, Target
from streamer.adapters import adapter_for


class _Stop(Exception):
    pass


def compress_in_memory(
    model_dir: Path,
    method: Method,
    target: Target,
    windows: torch.Tensor,
    true_sequential: bool = False,
    precomputed: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """precomputed: by full layer name (model.layers.0.mlp.up_proj), what the method's `statistic` takes besides it."""
    precomputed = precomputed or {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    adapter = adapter_for(model.config.to_dict())
    blocks = model.get_submodule(adapter.blocks)
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
    hidden = [h for h, _, _ in captured]
    _, args, kwargs = captured[0]

    def forward(block, x):
        out = block(x, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    groups = list(adapter.sequential_groups) if true_sequential else [adapter.linear_names]
    with torch.no_grad():
        for index, block in enumerate(blocks):
            linears = {name: block.get_submodule(name) for name in adapter.linear_names}
            for group in groups:
                stats = {
                    name: method.statistic(linears[name], **precomputed.get(f"{adapter.blocks}.{index}.{name}", {}))
                    for name in group
                }
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
            hidden = [forward(block, x) for x in hidden]
    return model.state_dict()
