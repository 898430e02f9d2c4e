"""What layerpress needs to know of a model family, declared as data.

Everything else is derived from transformers' own model classes: the pre-block stage (embeddings, positions,
rotary tables, ALiBi, masks) is whatever the model's forward computes before it calls its first block, captured
at run time (see streamer/model.py). So an adapter only names where the blocks are, what follows them, which
linear layers a block has, in the order its forward uses them, and which of their channels can be removed whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..errors import LayerpressError


@dataclass(frozen=True)
class ChannelGroup:
    """Channels a block can lose whole (structured pruning): attention heads or MLP intermediate channels.

    The channels are output rows of the `producers` and input columns of the `consumer`; they are removed in
    units of equal width, laid out one after another in every one of these layers (unit u of a layer whose
    dimension holds `units` · w channels is channels u·w .. (u+1)·w − 1).

    name: the group's name in records ("attention", "mlp").
    producers: linear layers (relative to the block) whose output rows carry the channels, e.g. q/k/v, up/gate.
    consumer: the linear layer whose input columns take them, e.g. the attention output or MLP down projection.
    units_key: config attribute giving the number of units per layer (for grouped-query attention the key/value
        heads: a unit is one key/value head with the query heads that share it); None: every consumer input
        column is a unit (MLP channels).
    head_attributes: module attributes (relative to the block) that hold a per-layer count the forward reshapes
        with, paired with the config attribute they are built from; they are scaled to the units kept.
    """

    name: str
    producers: tuple[str, ...]
    consumer: str
    units_key: str | None = None
    head_attributes: tuple[tuple[str, str], ...] = ()


EXPERT = "{expert}"  # in a layer name of `sequential_groups`: one such layer per expert of the config


@dataclass(frozen=True)
class ExpertLayout:
    """A block's mixture of experts, which transformers fuses into 3-D tensors and layerpress builds unfused, one
    linear layer per expert matrix (streamer/experts.py).

    path: the fused experts module, relative to the block (its children become the experts 0, 1, ...).
    count_keys: the config.json keys that may give the number of experts (the first present counts: Qwen3-MoE's
        hub configs say num_experts, transformers 5 saves it as num_local_experts).
    gate, up, down: each expert's matrices as the checkpoint names them (e.g. Mixtral's w1, w3, w2).
    router: the router, relative to the block: transformers holds its [experts, H] weight as a parameter of a
        top-k module, not as a linear layer; it is compressed only on request (`Adapter.with_router`).
    every_block: config values under which every block has experts (Qwen-MoE's `decoder_sparse_step` 1, no
        `mlp_only_layers`); another value mixes dense and expert blocks, which one adapter's layer names cannot
        describe, and is refused.
    """

    path: str
    count_keys: tuple[str, ...]
    gate: str
    up: str
    down: str
    router: str
    every_block: tuple[tuple[str, Any], ...] = ()

    def expert_of(self, linear: str) -> int | None:
        """The expert a linear layer of the block belongs to (None: not an expert's)."""
        if not linear.startswith(self.path + "."):
            return None
        return int(linear[len(self.path) + 1 :].split(".", 1)[0])


@dataclass(frozen=True)
class Adapter:
    """One model family.

    name: shown in logs and errors.
    model_types: values of config.json's `model_type` this adapter serves.
    blocks: module path of the list of transformer blocks.
    final: module paths applied in order to the last block's output to get logits (absent ones are skipped,
        e.g. OPT-350m has no final layer norm but a projection).
    sequential_groups: the compressible linear layers of one block, relative to the block, grouped by the order of
        the block's forward: a group's inputs depend only on groups before it (used by --true-sequential).
    norms: the block's normalization layers, relative to the block (trained by --reconstruct norms); names a
        config does not build are skipped (Falcon builds `ln_attn`/`ln_mlp` or `input_layernorm`, per config).
    bias_flags: config.json flags that give the block's linear layers biases (set by --reconstruct biases so that
        the output, with its new bias tensors, loads in transformers); flags a family's config lacks are ignored.
    channel_groups: what structured pruning may remove from a block (empty: the family cannot be pruned so).
    unprunable: why the family declares no channel group (named in structured pruning's refusal), if it declares none.
    logit_softcap_key: config attribute of the cap the head applies to its logits (cap · tanh(logits / cap), Gemma
        2/3); the final stage applies it where the config sets it.
    experts: the block's mixture of experts, if it has one; layer names with EXPERT in `sequential_groups` and
        `shared_inputs` are expanded over the config's experts by `for_config`.
    shared_inputs: sets of layers the block's forward calls with one and the same input tensor (q/k/v of the
        attention's normalized input, gate/up of the MLP's): a method whose statistic depends on the input alone
        observes one statistic per set (streamer/block.py checks the identity on every micro-batch). A set with
        EXPERT is one set per expert. Layers named in none read inputs of their own.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    final: tuple[str, ...]
    sequential_groups: tuple[tuple[str, ...], ...]
    norms: tuple[str, ...] = ()
    bias_flags: tuple[str, ...] = ()
    channel_groups: tuple[ChannelGroup, ...] = ()
    unprunable: str = ""
    logit_softcap_key: str | None = None
    experts: ExpertLayout | None = None
    shared_inputs: tuple[tuple[str, ...], ...] = ()

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential_groups for name in group)

    def for_config(self, config: dict) -> "Adapter":
        """The adapter of a model of this config: each layer name with EXPERT once per expert, experts in order."""
        if self.experts is None:
            return self
        mixed = [f"{key} {config[key]!r}" for key, value in self.experts.every_block
                 if key in config and config[key] != value]
        if mixed:
            raise LayerpressError(f"{self.name}: blocks with and without experts ({', '.join(mixed)}) are not "
                                  "supported: every block must have the same layers")
        count = next(config[key] for key in self.experts.count_keys if key in config)
        groups = tuple(  # a group's layers outside the experts (a shared expert's) once, before the experts'
            (*(name for name in group if EXPERT not in name),
             *(name.replace(EXPERT, str(expert)) for expert in range(count) for name in group if EXPERT in name))
            for group in self.sequential_groups
        )
        shared = tuple(
            expanded
            for names in self.shared_inputs
            for expanded in ([tuple(name.replace(EXPERT, str(expert)) for name in names) for expert in range(count)]
                             if any(EXPERT in name for name in names) else [names])
        )
        return replace(self, sequential_groups=groups, shared_inputs=shared)

    def with_router(self) -> "Adapter":
        """This (config-expanded) adapter with the router compressible too, first in the group of the experts'
        gate projections: it reads the block's normalized input as they do, but every token of it (so it shares no
        statistic with the experts, who see only their routed tokens)."""
        if self.experts is None:
            raise LayerpressError(f"--compress-router: {self.name} has no mixture of experts, so no router")
        first_gate = f"{self.experts.path}.0.{self.experts.gate}"
        groups = tuple((self.experts.router, *group) if first_gate in group else group
                       for group in self.sequential_groups)
        return replace(self, sequential_groups=groups)

    def by_input(self, names: Sequence[str]) -> list[tuple[str, ...]]:
        """`names` grouped by the input tensor they read (`shared_inputs`), in the order of their first layers."""
        return group_by_input(names, self.shared_inputs)

    def block_norms(self, block: nn.Module) -> dict[str, nn.Module]:
        """The block's normalization layers that its config builds."""
        present = {}
        for name in self.norms:
            try:
                present[name] = block.get_submodule(name)
            except AttributeError:
                continue
        return present


def group_by_input(names: Sequence[str], shared_inputs: Sequence[Sequence[str]]) -> list[tuple[str, ...]]:
    """`names` grouped by the input they read: the members of each set of `shared_inputs` among them together,
    every other layer alone, in the order of each group's first layer in `names`."""
    set_of = {name: index for index, members in enumerate(shared_inputs) for name in members}
    groups: dict[object, list[str]] = {}
    for name in names:
        groups.setdefault(set_of.get(name, name), []).append(name)
    return [tuple(group) for group in groups.values()]
