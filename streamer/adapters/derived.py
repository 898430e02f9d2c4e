"""The adapter of a family no module here declares, derived from its config and transformers' module tree.

A block of the common shape is enough: the decoder layers are the model's one list of `num_hidden_layers`
modules, and every weight of a block lies in a linear layer or a normalization layer. Then
- the compressible layers are the block's linear layers, in the order the block registers them (which is the order
  its forward uses them in the common shape), each its own group for --true-sequential;
- the norms are the block's modules whose class name says Norm;
- the final stage is what the base model registers after the block list and holds weights (the final norm), then
  the output embeddings (the head), soft-capped where the config sets `final_logit_softcapping`;
- no channel groups (structured pruning is refused: the module tree does not say how heads lie in the layers) and
  no bias flags (--reconstruct biases trains the biases the checkpoint has).
Anything else (a mixture-of-experts block, fused 3-D expert tensors, Conv1D layers) is refused at once, in one
line naming the modules that break the rule.
"""

from __future__ import annotations

from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .base import Adapter

SOFTCAP_KEY = "final_logit_softcapping"


class NotDerivable(Exception):
    """The family's module tree does not follow the common shape; the message says what is missing."""


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__


def _meta_model(config: dict) -> nn.Module:
    try:
        settings = AutoConfig.for_model(**config)
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(settings)
    except (ValueError, KeyError, TypeError) as exc:
        raise NotDerivable(f"transformers builds no causal language model for it ({exc})") from exc


def _block_list(model: nn.Module, layers: int | None) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers and layers:
            return name
    raise NotDerivable(f"its model has no list of num_hidden_layers ({layers}) decoder layers")


def _check_block(block: nn.Module) -> None:
    """Every weight in a linear or normalization layer, or NotDerivable naming the modules that hold others."""
    others = [
        f"{name} ({type(module).__name__})"
        for name, module in block.named_modules()
        if module._parameters and not isinstance(module, nn.Linear) and not _is_norm(module)
    ]
    if others:
        raise NotDerivable(
            f"block weights outside linear and norm layers: {', '.join(others)} "
            "(mixture-of-experts and non-linear projections need a declared adapter)"
        )


def _final_paths(model: nn.Module, blocks: str) -> tuple[str, ...]:
    parent_path, _, list_name = blocks.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    children = list(parent.named_children())
    after = [name for name, _ in children[[name for name, _ in children].index(list_name) + 1 :]]
    prefix = parent_path + "." if parent_path else ""
    final = [prefix + name for name in after if any(True for _ in parent.get_submodule(name).parameters())]
    head = model.get_output_embeddings()
    head_path = next((name for name, module in model.named_modules() if module is head), None)
    if head_path is None:
        raise NotDerivable("its model has no output embeddings (head)")
    return (*final, head_path)


def derive_adapter(config: dict) -> Adapter:
    """The adapter of `config`'s family, derived by the rule above, or NotDerivable saying what is missing."""
    model = _meta_model(config)
    blocks = _block_list(model, getattr(model.config, "num_hidden_layers", None))
    block = model.get_submodule(blocks)[0]
    _check_block(block)
    linears = tuple(name for name, module in block.named_modules() if isinstance(module, nn.Linear))
    if not linears:
        raise NotDerivable("its blocks have no linear layers")
    model_type = config["model_type"]
    return Adapter(
        name=f"{model_type} (derived)",
        model_types=(model_type,),
        blocks=blocks,
        final=_final_paths(model, blocks),
        sequential_groups=tuple((name,) for name in linears),
        norms=tuple(name for name, module in block.named_modules() if _is_norm(module) and name),
        unprunable="its adapter is derived from the module tree, which does not say how heads lie in the layers",
        logit_softcap_key=SOFTCAP_KEY if config.get(SOFTCAP_KEY) else None,
    )
