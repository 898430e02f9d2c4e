"""One block's phases while it is on the device: observe ─► compress ─► [reconstruct].

The block loop (streamer/stream.py) reads the block, hands it over as a `BlockContext`, then propagates through it
and records it; what happens in between is here, and only the order of phases is: the maths is the method's.

Observe runs the calibration inputs through the block with hooks that feed each linear layer's inputs to the
method's statistics, stopping each micro-batch's forward as soon as its layers have their inputs. Layers that read
one input tensor (the adapter's `shared_inputs`: q/k/v, gate/up) share one statistic when the method allows it
(`Method.statistic_per_input`): it is observed once and each of them is compressed from it. Compress replaces
each layer's weight with the method's result. With --true-sequential, observe and compress run once per group of
layers (q/k/v, then the output projection, ...), so each group sees inputs that already went through compressed
groups. With --reconstruct, the first observation also keeps the dense block's outputs (in the outputs buffer,
which propagation fills only later); after compression a few parameters are trained towards them and merged
(methods/reconstruct.py), so the next block's inputs come from the block as written.

In a mixture of experts, an expert's layers see only the tokens the router sends it; an expert sent fewer than
--expert-min-tokens is observed again on every token (observe_starved_experts), its output keeping the routing.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from methods import LayerResult, Method, Target
from methods.base import Statistic
from methods.reconstruct import Reconstruction, ReconstructionReport, reconstruct

from .activations import Activations
from .adapters import Adapter
from .distributed import world
from .errors import LayerpressError
from .stream import BlockContext

log = logging.getLogger("layerpress")

DEFAULT_EXPERT_MIN_TOKENS = 16  # fewer routed calibration tokens than this: an expert's statistics from all tokens


def check_expert_min_tokens(count: int) -> None:
    if count < 1:
        raise LayerpressError("--expert-min-tokens must be at least 1: an expert without tokens has no statistics")


class LayersObserved(Exception):
    """Every observed layer has its inputs for this micro-batch: the rest of the block's forward is not needed."""


def observe(
    linears: dict[str, nn.Linear],
    statistics: dict[str, Statistic],
    run_block: Callable[[], None],
    stop_early: bool = False,
) -> dict[str, int]:
    """Run the block once with every layer's inputs fed to its statistic; returns the tokens each layer saw (all
    calibration tokens, but for a routed expert's layers only those the router sent it).

    stop_early: raise LayersObserved once the last of these layers has its inputs (`run_block` must catch it for
    each micro-batch, as `forward_until_observed` does); not for experts' layers, which a micro-batch may not call.

    Layers given one statistic object must read one input: it is fed by the first of them the forward calls, and
    each of the others must then be called with that very tensor before it is fed again, else LayerpressError
    (sharing is exact or refused, never approximate).
    """
    waiting: set[str] = set(statistics)
    tokens = dict.fromkeys(statistics, 0)
    readers: dict[int, set[str]] = {}
    for name, statistic in statistics.items():
        readers.setdefault(id(statistic), set()).add(name)
    unread: dict[int, tuple[weakref.ref, set[str]]] = {}  # a shared statistic's last input, readers yet to see it

    def feed(name: str, statistic: Statistic, inputs: torch.Tensor) -> None:
        key = id(statistic)
        if key in unread:
            fed, rest = unread[key]
            if name not in rest or fed() is not inputs:
                raise LayerpressError(f"layers {', '.join(sorted(readers[key]))} are declared to read one input, "
                                      f"but {name} was called with another")
            rest.discard(name)
            if not rest:
                del unread[key]
        else:
            statistic.update(inputs)
            if len(readers[key]) > 1:
                unread[key] = (weakref.ref(inputs), readers[key] - {name})
        tokens[name] += inputs.numel() // inputs.shape[-1]
        waiting.discard(name)
        if stop_early and not waiting:
            waiting.update(statistics)
            raise LayersObserved

    hooks = [
        linears[name].register_forward_pre_hook(lambda _, args, name=name, stat=stat: feed(name, stat, args[0]))
        for name, stat in statistics.items()
    ]
    try:
        run_block()
    finally:
        for hook in hooks:
            hook.remove()
    return tokens


def forward_until_observed(context: BlockContext) -> Callable[[], None]:
    """Run the block over every micro-batch, each forward stopped once the observed layers have their inputs."""

    def step(hidden: torch.Tensor) -> None:
        try:
            context.call(hidden)
        except LayersObserved:
            pass

    return lambda: context.acts.run(step, context.device, keep_outputs=False)


def observe_starved_experts(
    context: BlockContext,
    statistics: dict[str, Statistic],
    tokens: dict[str, int],
    min_tokens: int,
    fresh: Callable[[list[str]], dict[str, Statistic]],
) -> None:
    """The rule for experts the router sends few or no calibration tokens: an expert whose layers saw fewer than
    `min_tokens` takes its statistics from every calibration token instead (its layers observed again, the block's
    output keeping the real routing), logged with its token count. Replaces those layers' `statistics` with
    `fresh(names)`'s. Under torchrun `tokens` are this rank's: an expert is starved by all ranks' tokens."""
    layout = context.staged.adapter.experts
    if layout is None:
        return
    ranks = world()
    if ranks.distributed:
        counts = ranks.total(torch.tensor([tokens[name] for name in sorted(tokens)], dtype=torch.int64))
        tokens = dict(zip(sorted(tokens), counts.tolist()))
    starved = [name for name in statistics if layout.expert_of(name) is not None and tokens[name] < min_tokens]
    if not starved:
        return
    counts = {layout.expert_of(name): tokens[name] for name in starved}
    for expert, count in counts.items():
        log.info("block %d: expert %d received %d routed tokens (fewer than --expert-min-tokens %d): its "
                 "statistics from all %d calibration tokens", context.index + 1, expert, count, min_tokens,
                 context.acts.inputs.shape[0] * context.acts.inputs.shape[1])
    for name in starved:
        del statistics[name]  # freed before its replacement is made: the plan holds one statistic per input
    statistics.update(fresh(starved))
    experts = context.block.get_submodule(layout.path)
    experts.observe_all = set(counts)
    try:
        observe(context.linears, {name: statistics[name] for name in starved}, forward_until_observed(context))
    finally:
        experts.observe_all = set()


def statistic_readers(adapter: Adapter, names: Sequence[str], per_input: bool) -> list[tuple[str, ...]]:
    """`names` by the statistic they share: the layers reading one input (`Adapter.shared_inputs`) together when
    the method's statistic is the input's (per_input: its `statistic_per_input`), else each layer alone."""
    return adapter.by_input(names) if per_input else [(name,) for name in names]


def compress_block(
    context: BlockContext,
    method: Method,
    groups: list[tuple[str, ...]],
    target_for: Callable[[str], Target],
    per_layer_statistics: bool = False,
    keep_dense_outputs: bool = False,
    precomputed: dict[str, dict[str, torch.Tensor]] | None = None,
    expert_min_tokens: int = DEFAULT_EXPERT_MIN_TOKENS,
) -> dict[str, LayerResult]:
    """Compress every linear layer of the block in place, group by group; returns each layer's result, whose weight
    is the layer's own (installed, not a copy).

    per_layer_statistics: observe one input of a group at a time (one statistic in memory instead of the group's:
    a layer's, or the one its layers share). The inputs are taken from the last to the first: a layer's inputs depend
    only on the layers before it, so each result goes in at once and every layer is still observed on the inputs it
    has when the group is observed at once.
    keep_dense_outputs: leave the dense block's outputs in acts.outputs (the first observation, which runs before
    anything is compressed, runs whole and stores them; a method that observes nothing gets one forward for them).
    precomputed: by layer name, the tensors the method's `statistic` takes besides the layer (see Method.precomputed).
    expert_min_tokens: experts routed fewer calibration tokens are observed on all of them (observe_starved_experts).
    """
    linears = context.linears
    precomputed = precomputed or {}
    results = {}
    dense_outputs_pending = keep_dense_outputs
    adapter = context.staged.adapter
    stop_early = adapter.experts is None
    ranks = world()
    layer_costs = {name: _solve_cost(method, layer, target_for(context.layer_name(name)))
                   for name, layer in linears.items()} if ranks.distributed else dict.fromkeys(linears, 0.0)

    def fresh(names: Sequence[str]) -> dict[str, Statistic]:
        """A statistic for each layer of `names` that needs one, one object for the layers sharing it."""
        statistics = {}
        for readers in statistic_readers(adapter, names, method.statistic_per_input):
            first = readers[0]
            if (statistic := method.statistic(linears[first], **precomputed.get(first, {}))) is not None:
                statistics.update(dict.fromkeys(readers, statistic))
        return statistics

    def observe_inputs(statistics: dict[str, Statistic]) -> None:
        """Observe the layers of `statistics` (experts starved of tokens: again, on all; see the rule above)."""
        nonlocal dense_outputs_pending
        with context.phase("observe"):
            if dense_outputs_pending:
                tokens = observe(linears, statistics, lambda: context.forward(keep_outputs=True))
                dense_outputs_pending = False
            else:
                tokens = observe(linears, statistics, forward_until_observed(context), stop_early=stop_early)
            observe_starved_experts(context, statistics, tokens, expert_min_tokens, fresh)
        if ranks.distributed:  # every rank's statistics become the sums over all ranks' windows
            with context.phase("combine"):
                ranks.combine(statistics)

    def compress_layers(names: Sequence[str], statistics: dict[str, Statistic]) -> None:
        """Compress `names` (each on the rank assigned to it), then install every result on every rank."""
        nonlocal dense_outputs_pending
        if dense_outputs_pending:
            with context.phase("observe"):
                context.forward(keep_outputs=True)
            dense_outputs_pending = False
        owners = ranks.assign({name: layer_costs[name] for name in names})
        for name in names:  # each statistic is dropped as soon as its layer is done
            statistic = statistics.pop(name, None)
            if owners[name] == ranks.rank:
                with context.phase("compress"):
                    results[name] = _compress_layer(context, method, name, statistic, target_for)
        if ranks.distributed:
            with context.phase("share"):
                for name in names:
                    results[name] = _install(context, name, ranks.broadcast(results.get(name), owners[name]))

    for group in groups:
        if per_layer_statistics:
            for readers in reversed(statistic_readers(adapter, group, method.statistic_per_input)):
                statistics = fresh(readers)
                if statistics:
                    observe_inputs(statistics)
                compress_layers(readers, statistics)
        else:
            observed = fresh(group)
            if observed:
                observe_inputs(observed)  # starved experts' statistics are replaced in it
            compress_layers(group, observed)  # each statistic is dropped as soon as its last layer is done
    return {name: results[name] for group in groups for name in group}  # in layer order, however observed


def _compress_layer(
    context: BlockContext, method: Method, name: str, statistic: Statistic | None, target_for: Callable[[str], Target]
) -> LayerResult:
    """Compress one layer and install the result in it (the result then holds the layer's weight, not a copy)."""
    layer, full_name = context.linears[name], context.layer_name(name)
    context.phase.layer = full_name  # named if the device runs out of memory (kept when an error leaves)
    try:
        result = method.compress(layer, statistic, target_for(full_name))
    except ValueError as exc:
        raise LayerpressError(f"{method.name} failed on {full_name}: {exc}") from exc
    context.phase.layer = None
    if not torch.isfinite(result.weight).all():
        raise LayerpressError(f"{method.name} produced non-finite weights for {full_name}")
    return _install(context, name, result)


def _install(context: BlockContext, name: str, result: LayerResult) -> LayerResult:
    """Put a layer's result (made here or on another rank) into the layer; the result then holds the layer's
    weight, and its other tensors are on the layer's device."""
    weight = context.linears[name].weight.data
    weight.copy_(result.weight)
    device = weight.device
    mask = result.mask.to(device) if result.mask is not None else None
    quant = result.quant
    if quant is not None and quant.ints.device != device:
        quant = replace(quant, ints=quant.ints.to(device), scale=quant.scale.to(device), zero=quant.zero.to(device),
                        g_idx=quant.g_idx.to(device))
    return replace(result, weight=weight, mask=mask, quant=quant)


def _solve_cost(method: Method, layer: nn.Linear, target: Target) -> float:
    """How much work compressing the layer is, to balance the ranks' shares of a block: the method's own counts
    (LayerCost), its sequential operations weighed as a thousand flops each, and a pass over its weights (all a
    method without solves costs)."""
    rows, columns = layer.out_features, layer.in_features
    cost = method.layer_cost(rows, columns, layer.weight.dtype, target)
    return rows * columns + cost.matmul_flops + cost.factor_flops + 1e3 * cost.sequential_ops + cost.sequential_bytes


def zero_fraction(weight: torch.Tensor) -> float:
    return torch.count_nonzero(weight == 0).item() / weight.numel()


class TargetBatches(Sequence):
    """The calibration micro-batches on the device, each with the dense block's outputs for it (the targets)."""

    def __init__(self, acts: Activations, device: torch.device):
        self.acts, self.device, self.slices = acts, device, acts.batches()

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.slices[index]
        return self.acts.inputs.data[batch].to(self.device), self.acts.outputs.data[batch].to(self.device)


def block_seed(seed: int, index: int) -> int:
    """The seed of everything random in block `index`'s reconstruction: a resumed run draws the same numbers."""
    return (seed << 32) + index


def reconstruct_block(context: BlockContext, settings: Reconstruction, seed: int) -> ReconstructionReport:
    """Train the block (already compressed; its dense outputs in acts.outputs) towards those outputs, then merge."""
    generator = torch.Generator().manual_seed(block_seed(seed, context.index))
    batches = TargetBatches(context.acts, context.device)
    try:
        with context.phase("reconstruct"):
            ranks = world()  # under torchrun: each step one micro-batch per rank, their gradients averaged
            report = reconstruct(context.block, context.linears, context.norms, context.call, batches, settings,
                                 generator, ranks.average if ranks.distributed else None)
    except ValueError as exc:
        raise LayerpressError(f"reconstruction of block {context.index} failed: {exc}") from exc
    log.info(
        "block %d: reconstructed %s in %.2fs: output MSE %.4g -> %.4g, %d parameters trained (%.3f%% of the block's)",
        context.index + 1, ",".join(settings.subsets), context.phase.seconds["reconstruct"], report.loss_before,
        report.loss_after, report.trained, 100 * report.trained / report.total,
    )
    return report
