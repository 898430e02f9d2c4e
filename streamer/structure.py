"""Per-block shapes of structurally pruned models, and the one function that builds any model's skeleton.

config.json cannot say that block 3 kept 2 of its 3 attention units and 1210 of its 1536 MLP channels, nor give
a bias to a linear layer its family builds without one. A structurally pruned checkpoint records both in
config.json, next to transformers' own keys:

    "layerpress_structure": {
        "units": {"attention": [3, 2, ...], "mlp": [1536, 1210, ...]},   units kept, one entry per block
        "biases": ["self_attn.o_proj", "mlp.down_proj"]                 linears (in every block) given a bias
    }

Units are those of the family's channel groups (streamer/adapters/): for attention a key/value head with the query
heads sharing it (a plain head without grouped-query attention), for the MLP one intermediate channel.
`build_skeleton` builds transformers' own model class from the config on the meta device, then resizes every
block's linear layers (and per-layer head counts) to the record. StagedModel (compress, eval) and `load_model`
(streamer/model.py, for generate and any other use) both build models with it, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .adapters import Adapter, adapter_for
from .adapters.base import ChannelGroup
from .errors import LayerpressError
from .experts import unfuse_experts

STRUCTURE_KEY = "layerpress_structure"


@dataclass(frozen=True)
class GroupLayout:
    """How one channel group's units lie in a block of the model's config (before any pruning)."""

    group: ChannelGroup
    units: int
    widths: dict[str, int]  # channels per unit in each producer's rows and the consumer's columns
    head_counts: dict[str, int]  # config value behind each head attribute

    def units_in(self, block: nn.Module) -> int:
        """Units the block holds now (fewer than `units` in a pruned block)."""
        return block.get_submodule(self.group.consumer).in_features // self.widths[self.group.consumer]

    def unit_cost(self, block: nn.Module) -> int:
        """Parameters (weights and the producers' biases) that go with one unit of this block."""
        cost = 0
        for name in self.group.producers:
            layer = block.get_submodule(name)
            cost += self.widths[name] * (layer.in_features + (layer.bias is not None))
        return cost + self.widths[self.group.consumer] * block.get_submodule(self.group.consumer).out_features


def layout_of(config: PretrainedConfig, block: nn.Module, group: ChannelGroup) -> GroupLayout:
    """The layout of `group` in an unpruned block built from `config`."""
    consumer = block.get_submodule(group.consumer)
    units = getattr(config, group.units_key) if group.units_key else consumer.in_features
    sizes = {name: block.get_submodule(name).out_features for name in group.producers}
    sizes[group.consumer] = consumer.in_features
    if not units or any(size % units for size in sizes.values()):
        raise LayerpressError(f"{group.name}: layer sizes {sizes} are not multiples of {units} units")
    head_counts = {attribute: getattr(config, key) for attribute, key in group.head_attributes}
    return GroupLayout(group, units, {name: size // units for name, size in sizes.items()}, head_counts)


def _replace_linear(block: nn.Module, path: str, in_features: int, out_features: int, bias: bool) -> None:
    old = block.get_submodule(path)
    block.set_submodule(path, nn.Linear(in_features, out_features, bias=bias, device=old.weight.device,
                                        dtype=old.weight.dtype))


def add_bias(block: nn.Module, path: str) -> None:
    layer = block.get_submodule(path)
    if layer.bias is None:
        _replace_linear(block, path, layer.in_features, layer.out_features, bias=True)


def resize_group(block: nn.Module, layout: GroupLayout, kept: int) -> None:
    """Give the block's layers of this group the shapes of `kept` units (keeping their bias or lack of one)."""
    group = layout.group
    for name in group.producers:
        layer = block.get_submodule(name)
        _replace_linear(block, name, layer.in_features, kept * layout.widths[name], layer.bias is not None)
    consumer = block.get_submodule(group.consumer)
    _replace_linear(
        block, group.consumer, kept * layout.widths[group.consumer], consumer.out_features, consumer.bias is not None
    )
    for attribute, count in layout.head_counts.items():
        module, _, leaf = attribute.rpartition(".")
        setattr(block.get_submodule(module), leaf, count * kept // layout.units)


def check_structure(record: Any, layouts: dict[str, GroupLayout], num_blocks: int, linears: tuple[str, ...]) -> None:
    """One clear error for a `layerpress_structure` record this model cannot have."""
    if not isinstance(record, dict) or not isinstance(record.get("units", {}), dict):
        raise LayerpressError(f"config.json: {STRUCTURE_KEY} must be an object with 'units' and 'biases'")
    for name, kept in record.get("units", {}).items():
        if name not in layouts:
            raise LayerpressError(f"config.json: {STRUCTURE_KEY} names group {name!r}; this family has {sorted(layouts)}")
        if not isinstance(kept, list) or len(kept) != num_blocks:
            raise LayerpressError(f"config.json: {STRUCTURE_KEY} needs one {name} unit count per block ({num_blocks})")
        if not all(isinstance(k, int) and 1 <= k <= layouts[name].units for k in kept):
            raise LayerpressError(f"config.json: {STRUCTURE_KEY} {name} counts must lie in 1..{layouts[name].units}")
    unknown = set(record.get("biases", [])) - set(linears)
    if unknown:
        raise LayerpressError(f"config.json: {STRUCTURE_KEY} adds biases to unknown layers {sorted(unknown)}")


@dataclass
class Skeleton:
    model: PreTrainedModel
    adapter: Adapter
    layouts: dict[str, GroupLayout]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.adapter.blocks)


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> Skeleton:
    """transformers' model class for `config` on the meta device, with the per-block shapes it records."""
    adapter = adapter_for(config.to_dict())
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    skeleton = Skeleton(model, adapter, {})
    blocks = skeleton.blocks
    if adapter.experts is not None:
        for block in blocks:
            unfuse_experts(block, adapter.experts)
    skeleton.layouts = {group.name: layout_of(config, blocks[0], group) for group in adapter.channel_groups}
    record = getattr(config, STRUCTURE_KEY, None)
    if record is not None:
        check_structure(record, skeleton.layouts, len(blocks), adapter.linear_names)
        for index, block in enumerate(blocks):
            for path in record.get("biases", []):
                add_bias(block, path)
            for name, kept in record.get("units", {}).items():
                resize_group(block, skeleton.layouts[name], kept[index])
    return skeleton
