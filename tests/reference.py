"""In-memory oracles: the same compression algorithms run on the whole model, loaded by transformers.

They do what the reference implementations (SparseGPT's, Wanda's and FLAP's scripts) do: load the full model, catch
the first block's inputs and call arguments from the model's own forward, then walk the blocks in memory.
Streaming must give the same tensors. With a reconstruction, each block is also trained towards its dense outputs
(as PERP's layer-wise reconstruction does it in memory), with the seeds the streaming run uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from methods import Method, StructuredMethod, Target
from methods.base import ChannelSummary, UnitGroup
from methods.flap import unit_channels
from methods.reconstruct import Reconstruction, reconstruct
from streamer.adapters import Adapter, adapter_for
from streamer.block import DEFAULT_EXPERT_MIN_TOKENS, block_seed
from streamer.experts import unfuse_experts
from streamer.structure import layout_of


def recorded_micro_batch(out: Path) -> int:
    """The micro-batch a streamed run recorded in its output: an oracle batches its windows alike, because a bigger
    batch sums the statistics in another order."""
    return json.loads((Path(out) / "config.json").read_text())["layerpress"]["micro_batch"]


def first_block_inputs(
    model: nn.Module, windows: torch.Tensor, micro_batch: int = 1
) -> tuple[list[torch.Tensor], Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """The first block's inputs for each micro-batch of windows, and a function that calls any block the way the
    model calls it (each block with its own arguments: Gemma's sliding-window layers get other masks than its global
    ones)."""
    blocks = model.get_submodule(adapter_for(model.config.to_dict()).blocks)
    first_inputs: list[torch.Tensor] = []
    calls: dict[int, tuple[tuple, dict]] = {}

    def record(module, args, kwargs):
        if module is blocks[0]:
            first_inputs.append(args[0])
        calls.setdefault(id(module), (args[1:], kwargs))

    hooks = [block.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    with torch.no_grad():
        for batch in windows.split(micro_batch):
            model(batch, use_cache=False)
    for hook in hooks:
        hook.remove()

    def forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        args, kwargs = calls[id(block)]
        out = block(x, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return first_inputs, forward


def in_memory_model(model_dir: Path) -> PreTrainedModel:
    """transformers' model of the checkpoint in float32, its fused experts (if any) unfused as layerpress builds
    them (the same computation, one linear layer per expert matrix)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    adapter = adapter_for(model.config.to_dict())
    if adapter.experts is not None:
        for block in model.get_submodule(adapter.blocks):
            unfuse_experts(block, adapter.experts)
    return model


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
    precomputed: dict[str, dict[str, torch.Tensor]] | None = None,
    target_for: Callable[[str], Target] | None = None,
    expert_min_tokens: int = DEFAULT_EXPERT_MIN_TOKENS,
    micro_batch: int = 1,
) -> dict[str, torch.Tensor]:
    """precomputed: by full layer name (model.layers.0.mlp.up_proj), what the method's `statistic` takes besides it;
    target_for: each layer's own target, by full layer name (default: `target` for all);
    expert_min_tokens: an expert routed fewer tokens takes its statistics from every token (streamer/block.py);
    micro_batch: windows per forward, as the streamed run took them (`recorded_micro_batch`)."""
    precomputed = precomputed or {}
    reconstruction = reconstruction or Reconstruction()
    if "biases" in reconstruction.subsets:
        model = load_with_biases(model_dir).eval()
    else:
        model = in_memory_model(model_dir)
    model.requires_grad_(False)
    adapter = adapter_for(model.config.to_dict())
    blocks = model.get_submodule(adapter.blocks)
    hidden, forward = first_block_inputs(model, windows, micro_batch)
    groups = list(adapter.sequential_groups) if true_sequential else [adapter.linear_names]
    for index, block in enumerate(blocks):
        with torch.no_grad():
            dense = [forward(block, x) for x in hidden] if reconstruction.enabled else []
            linears = {name: block.get_submodule(name) for name in adapter.linear_names}
            for group in groups:
                stats = {
                    name: method.statistic(linears[name], **precomputed.get(f"{adapter.blocks}.{index}.{name}", {}))
                    for name in group
                }
                if any(s is not None for s in stats.values()):
                    tokens = feed(linears, stats, lambda: [forward(block, x) for x in hidden])
                    again = [name for name in group if adapter.experts is not None
                             and adapter.experts.expert_of(name) is not None and tokens[name] < expert_min_tokens]
                    if again:  # the starved experts again, on every token
                        for name in again:
                            stats[name] = method.statistic(
                                linears[name], **precomputed.get(f"{adapter.blocks}.{index}.{name}", {})
                            )
                        experts = block.get_submodule(adapter.experts.path)
                        experts.observe_all = {adapter.experts.expert_of(name) for name in again}
                        feed(linears, {name: stats[name] for name in again},
                             lambda: [forward(block, x) for x in hidden])
                        experts.observe_all = set()
                for name in group:
                    layer_target = target_for(f"{adapter.blocks}.{index}.{name}") if target_for else target
                    result = method.compress(linears[name], stats[name], layer_target)
                    linears[name].weight.copy_(result.weight)
        if reconstruction.enabled:
            norms = adapter.block_norms(block)
            generator = torch.Generator().manual_seed(block_seed(seed, index))
            batches = list(zip(hidden, dense))
            reconstruct(block, linears, norms, lambda x: forward(block, x), batches, reconstruction, generator)
        with torch.no_grad():
            hidden = [forward(block, x) for x in hidden]
    return model.state_dict()


def structured_in_memory(
    model_dir: Path, method: StructuredMethod, windows: torch.Tensor
) -> tuple[dict[str, torch.Tensor], PreTrainedModel, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]:
    """A structured method on the whole model, statistics from the dense model as the FLAP reference takes them.

    Returns the pruned layers' expected tensors (model names), the dense model with the removed units zeroed and
    the compensation in its biases (it must compute exactly what the smaller model computes), and the mean and
    variance of every consumer's inputs over all calibration tokens, taken directly on all tokens at once
    ((block, group) -> (mean, variance)).
    """
    model, adapter, hidden, forward = load_in_memory(model_dir, windows)
    blocks = model.get_submodule(adapter.blocks)
    layouts = {group.name: layout_of(model.config, blocks[0], group) for group in adapter.channel_groups}
    summaries: list[dict[str, ChannelSummary]] = []
    units: list[UnitGroup] = []
    direct: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for index, block in enumerate(blocks):
            consumers = {name: block.get_submodule(layout.group.consumer) for name, layout in layouts.items()}
            stats = {name: method.statistic(layer) for name, layer in consumers.items()}
            seen: dict[str, list[torch.Tensor]] = {name: [] for name in consumers}
            keep_inputs = [consumers[name].register_forward_pre_hook(lambda _, a, n=name: seen[n].append(a[0]))
                           for name in consumers]
            feed(consumers, stats, lambda: [forward(block, x) for x in hidden])
            for hook in keep_inputs:
                hook.remove()
            for name, inputs in seen.items():
                flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).double()
                direct[(index, name)] = (flat.mean(dim=0), flat.var(dim=0, unbiased=False))
            summaries.append({name: method.summarize(consumers[name], stats[name]) for name in consumers})
            units += [UnitGroup(index, name, summaries[-1][name].score, layout.units, layout.unit_cost(block))
                      for name, layout in layouts.items()]
            hidden = [forward(block, x) for x in hidden]
        masks = method.select(units)
        expected: dict[str, torch.Tensor] = {}
        for group, keep in zip(units, masks):
            block, layout = blocks[group.block], layouts[group.name]
            producers = {path: block.get_submodule(path) for path in layout.group.producers}
            consumer = block.get_submodule(layout.group.consumer)
            pruned, new_consumer = method.prune(producers, consumer, keep, summaries[group.block][group.name])
            prefix = f"{adapter.blocks}.{group.block}."
            for path, layer in (*pruned.items(), (layout.group.consumer, new_consumer)):
                expected[f"{prefix}{path}.weight"] = layer.weight.clone()
                if layer.bias is not None:
                    expected[f"{prefix}{path}.bias"] = layer.bias.clone()
            for path, layer in producers.items():
                removed = unit_channels(~keep, layer.out_features // group.units)
                layer.weight[removed] = 0
                if layer.bias is not None:
                    layer.bias[removed] = 0
            consumer.weight[:, unit_channels(~keep, consumer.in_features // group.units)] = 0
            if new_consumer.bias is not None:
                consumer.bias = nn.Parameter(new_consumer.bias.clone())
    return expected, model, direct


def load_in_memory(
    model_dir: Path, windows: torch.Tensor
) -> tuple[PreTrainedModel, Adapter, list[torch.Tensor], Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """The whole model, its adapter, the first block's input for every window, and how to call a block."""
    model = in_memory_model(model_dir)
    hidden, forward = first_block_inputs(model, windows)
    return model, adapter_for(model.config.to_dict()), hidden, forward


def feed(layers: dict[str, nn.Linear], statistics: dict, run: Callable[[], object]) -> dict[str, int]:
    """Run with every named layer's inputs fed to its statistic; returns the tokens each layer saw."""
    tokens = dict.fromkeys(statistics, 0)

    def update(name: str, inputs: torch.Tensor) -> None:
        statistics[name].update(inputs)
        tokens[name] += inputs.numel() // inputs.shape[-1]

    hooks = [layers[name].register_forward_pre_hook(lambda _, a, name=name: update(name, a[0]))
             for name, s in statistics.items() if s is not None]
    run()
    for hook in hooks:
        hook.remove()
    return tokens
