"""Mixture-of-experts blocks with one linear layer per expert matrix, as checkpoints store them.

transformers 5 holds a block's experts as fused 3-D tensors (`gate_up_proj` [experts, 2·I, H], `down_proj`
[experts, H, I]) and builds them from the checkpoint's per-expert matrices on loading. layerpress builds its
skeleton with one `nn.Linear` per expert matrix instead, named as the checkpoint names them, so that
- each expert's layers are ordinary compressible linear layers, whose statistics come from exactly the tokens the
  router sends them (their hooks see only those),
- the checkpoint's own per-expert tensors are read and written as they are (every input byte read once).

`UnfusedExperts.forward` computes what transformers' fused experts compute, expert by expert. Its
`observe_all` experts (for statistics only) run on every token: their routed outputs are the rows of those
tokens, so the block's output keeps the real routing while their layers' hooks see all tokens once.
`LinearRouter` makes the router a linear layer, for --compress-router.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters.base import ExpertLayout


class ExpertMLP(nn.Module):
    """One expert: gate and up projections, activation, down projection (the checkpoint's names)."""

    def __init__(self, layout: ExpertLayout, hidden: int, intermediate: int, act_fn: nn.Module, device, dtype):
        super().__init__()
        self.layout = layout
        self.act_fn = act_fn
        for name, (inputs, outputs) in ((layout.gate, (hidden, intermediate)), (layout.up, (hidden, intermediate)),
                                        (layout.down, (intermediate, hidden))):
            self.add_module(name, nn.Linear(inputs, outputs, bias=False, device=device, dtype=dtype))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in (self.layout.gate, self.layout.up, self.layout.down))
        return down(self.act_fn(gate(hidden)) * up(hidden))


class UnfusedExperts(nn.ModuleList):
    """A fused experts module's computation with one ExpertMLP per expert (same call: hidden states of shape
    [tokens, H], the router's top-k expert indices and weights per token)."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.observe_all: set[int] = set()

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden)
        for index, expert in enumerate(self):
            tokens, top_k_position = torch.where(top_k_index == index)
            if index in self.observe_all:
                routed = expert(hidden)[tokens]
            elif tokens.numel():
                routed = expert(hidden[tokens])
            else:
                continue
            routed = routed * top_k_weights[tokens, top_k_position, None]
            output.index_add_(0, tokens, routed.to(output.dtype))
        return output


def unfuse_experts(block: nn.Module, layout: ExpertLayout) -> None:
    """Replace the block's fused experts by UnfusedExperts, with the fused weights' values where they are real
    (transformers' loading concatenates gate and up along the rows: gate_up_proj[e] = [gate_e; up_e])."""
    fused = block.get_submodule(layout.path)
    gate_up, down = fused.gate_up_proj, fused.down_proj
    count, double_intermediate, hidden = gate_up.shape
    intermediate = double_intermediate // 2
    experts = [ExpertMLP(layout, hidden, intermediate, fused.act_fn, gate_up.device, gate_up.dtype)
               for _ in range(count)]
    if gate_up.device.type != "meta":
        with torch.no_grad():
            for index, expert in enumerate(experts):
                getattr(expert, layout.gate).weight.copy_(gate_up[index, :intermediate])
                getattr(expert, layout.up).weight.copy_(gate_up[index, intermediate:])
                getattr(expert, layout.down).weight.copy_(down[index])
    block.set_submodule(layout.path, UnfusedExperts(experts))


class LinearRouter(nn.Linear):
    """A top-k router as a linear layer (the same [experts, H] `weight`, so the same checkpoint name), so that
    --compress-router compresses it like any other layer. Its forward is the family's own router's, called on this
    module: transformers' routers use only `weight` and the attributes copied here."""

    ROUTING_ATTRIBUTES = ("top_k", "num_experts", "hidden_dim", "norm_topk_prob")

    def __init__(self, router: nn.Module):
        experts, hidden = router.weight.shape
        super().__init__(hidden, experts, bias=False, device=router.weight.device, dtype=router.weight.dtype)
        for attribute in self.ROUTING_ATTRIBUTES:
            if hasattr(router, attribute):
                setattr(self, attribute, getattr(router, attribute))
        self._route = type(router).forward
        if router.weight.device.type != "meta":
            with torch.no_grad():
                self.weight.copy_(router.weight)

    def forward(self, hidden: torch.Tensor):  # the router's outputs: logits, top-k weights, top-k indices
        return self._route(self, hidden)


def linear_router(block: nn.Module, layout: ExpertLayout) -> None:
    """Replace the block's router by a LinearRouter that routes the same way."""
    block.set_submodule(layout.router, LinearRouter(block.get_submodule(layout.router)))
