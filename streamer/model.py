"""A transformers model whose weights stay on disk: only the stage being processed is materialized.

The skeleton is built from config.json with transformers' own class on the meta device. Its parameters are replaced
by real tensors stage by stage (pre-block stage, one block, final stage) and turned back into meta tensors when the
stage is done, so memory holds one stage at a time whatever the depth of the model.

How a block is called is not written down per family: the model's own forward is run with a catcher in place of
the first block, which records the arguments (masks, rotary tables, ALiBi, position ids) the model passes to it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers import AutoConfig, GenerationConfig, PreTrainedModel

from .adapters import Adapter
from .checkpoint import Checkpoint
from .errors import LayerpressError
from .structure import GroupLayout, build_skeleton


@dataclass
class BlockExtras:
    """Everything a block's forward takes besides the hidden states, as the model itself passes it."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


class _FirstBlockReached(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0: records how the model calls it, then stops the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None
        self.extras: BlockExtras | None = None

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self.hidden = hidden
        self.extras = BlockExtras(args, kwargs)
        raise _FirstBlockReached


def checkpoint_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The dtype the checkpoint was saved in: config.json's record, else its first floating tensor's."""
    recorded = checkpoint.config.get("dtype") or checkpoint.config.get("torch_dtype")
    if isinstance(recorded, str) and isinstance(getattr(torch, recorded, None), torch.dtype):
        return getattr(torch, recorded)
    for entry in checkpoint.entries.values():
        if entry.dtype.is_floating_point:
            return entry.dtype
    return torch.float32


class StagedModel:
    """The skeleton of a checkpoint's model, with methods to materialize and release one stage at a time.

    The skeleton has the checkpoint's per-block shapes when it was structurally pruned (streamer/structure.py).
    """

    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype | None = None):
        self.checkpoint = checkpoint
        self.device = device
        self.dtype = dtype or checkpoint_dtype(checkpoint)
        try:
            config = AutoConfig.from_pretrained(checkpoint.directory)
        except (ValueError, KeyError, OSError) as exc:
            raise LayerpressError(f"cannot read the model config in {checkpoint.directory}: {exc}") from exc
        config.use_cache = False
        skeleton = build_skeleton(config, self.dtype)
        self.model = skeleton.model
        self.adapter: Adapter = skeleton.adapter
        self.layouts: dict[str, GroupLayout] = skeleton.layouts
        self.model.eval().requires_grad_(False)
        for module in self.model.modules():  # real buffers (rotary tables) follow the compute device
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(device)
        self.config = config
        self.blocks: nn.ModuleList = self.model.get_submodule(self.adapter.blocks)
        self._names = {name: self._checkpoint_name(name) for name in self.model.state_dict()}
        self._check_linears()

    # ---------------------------------------------------------------- names
    def _checkpoint_name(self, name: str) -> str:
        entries = self.checkpoint.entries
        prefix = self.model.base_model_prefix + "."
        if name in entries:
            return name
        if name.startswith(prefix) and name[len(prefix) :] in entries:
            return name[len(prefix) :]  # checkpoints saved from the base model (facebook/opt-*, bigscience/bloom)
        tied = getattr(self.model, "_tied_weights_keys", None)
        if isinstance(tied, dict) and name in tied and getattr(self.config, "tie_word_embeddings", True):
            return self._checkpoint_name(tied[name])
        raise LayerpressError(
            f"checkpoint {self.checkpoint.directory} lacks tensor {name!r} that its {self.adapter.name} config needs"
        )

    def _check_linears(self) -> None:
        block = self.blocks[0]
        for name in self.adapter.linear_names:
            if not isinstance(block.get_submodule(name), nn.Linear):
                raise LayerpressError(f"{self.adapter.name} block has no linear layer {name!r}")

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_prefix(self, index: int) -> str:
        return f"{self.adapter.blocks}.{index}."

    def block_names(self, index: int) -> list[str]:
        """Model state-dict names of block `index`."""
        prefix = self.block_prefix(index)
        return [name for name in self._names if name.startswith(prefix)]

    def checkpoint_names(self, names: list[str]) -> list[str]:
        return [self._names[name] for name in names]

    def output_name(self, name: str) -> str:
        """The checkpoint-style name of a model tensor; one the checkpoint lacks (a bias added by structured
        pruning) is named like its module's weight, so base-model checkpoints keep their naming."""
        if name in self._names:
            return self._names[name]
        module, _, leaf = name.rpartition(".")
        return self._names[f"{module}.weight"].removesuffix("weight") + leaf

    def block_checkpoint_names(self, index: int) -> list[str]:
        return self.checkpoint_names(self.block_names(index))

    def non_block_checkpoint_names(self) -> list[str]:
        """Checkpoint tensors outside every block, in checkpoint order (copied to the output bit for bit)."""
        in_blocks = {self._names[name] for name in self._names if name.startswith(self.adapter.blocks + ".")}
        return [name for name in self.checkpoint.entries if name not in in_blocks]

    # ---------------------------------------------------------------- materialize / release
    def _set(self, name: str, tensor: torch.Tensor) -> None:
        module_path, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(module_path)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[leaf] = tensor

    def materialize(self, names: list[str]) -> None:
        """Read the named tensors from the checkpoint onto the device, floating ones in the compute dtype."""
        tensors = self.checkpoint.read(list(dict.fromkeys(self.checkpoint_names(names))))
        for name in names:
            tensor = tensors[self._names[name]]
            dtype = self.dtype if tensor.dtype.is_floating_point else tensor.dtype
            self._set(name, tensor.to(device=self.device, dtype=dtype))

    def release(self, names: list[str]) -> None:
        """Turn the named tensors back into meta tensors, freeing their memory."""
        state = self.model.state_dict(keep_vars=True)
        for name in names:
            self._set(name, torch.empty_like(state[name], device="meta"))

    def materialize_all(self) -> PreTrainedModel:
        """Every tensor read onto the device: the whole model, for use outside the block stream."""
        self.materialize(list(self._names))
        return self.model

    def load_block(self, index: int) -> nn.Module:
        self.materialize(self.block_names(index))
        return self.blocks[index]

    def release_block(self, index: int) -> None:
        self.release(self.block_names(index))

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """Block `index`'s tensors under their checkpoint names, in the checkpoint's dtypes, on the CPU."""
        state = self.model.state_dict(keep_vars=True)
        out = {}
        for name in self.block_names(index):
            target = self.checkpoint.entries[self._names[name]].dtype
            out[self._names[name]] = state[name].detach().to(device="cpu", dtype=target)
        return out

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for name in self.adapter.linear_names}

    # ---------------------------------------------------------------- stages
    def _final_modules(self) -> list[nn.Module]:
        modules = []
        for path in self.adapter.final:
            parent, _, leaf = path.rpartition(".")
            module = getattr(self.model.get_submodule(parent) if parent else self.model, leaf, None)
            if module is not None:
                modules.append(module)
        return modules

    def _final_names(self) -> list[str]:
        names = []
        for path in self.adapter.final:
            names += [n for n in self._names if n.startswith(path + ".")]
        return names

    @contextmanager
    def pre_stage(self) -> Iterator[Embedder]:
        """Materialize everything the model computes before its first block (embeddings, positions)."""
        final = set(self._final_names())
        names = [n for n in self._names if not n.startswith(self.adapter.blocks + ".") and n not in final]
        self.materialize(names)
        try:
            yield Embedder(self)
        finally:
            self.release(names)

    @contextmanager
    def final_stage(self) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Materialize what follows the last block (final norm, head); yields hidden states -> logits."""
        names = self._final_names()
        self.materialize(names)
        modules = self._final_modules()

        def logits(hidden: torch.Tensor) -> torch.Tensor:
            for module in modules:
                hidden = module(hidden)
            return hidden

        try:
            yield logits
        finally:
            self.release(names)

    @staticmethod
    def call_block(block: nn.Module, hidden: torch.Tensor, extras: BlockExtras) -> torch.Tensor:
        output = block(hidden, *extras.args, **extras.kwargs)
        return output[0] if isinstance(output, tuple) else output


class Embedder:
    """The pre-block stage: token ids to the first block's hidden states, and the block call's extras."""

    def __init__(self, staged: StagedModel):
        self.staged = staged

    def _run_to_first_block(self, input_ids: torch.Tensor) -> _Catcher:
        blocks = self.staged.blocks
        catcher, first = _Catcher(), blocks[0]
        blocks[0] = catcher
        try:
            with torch.no_grad():
                self.staged.model(input_ids=input_ids.to(self.staged.device), use_cache=False)
        except _FirstBlockReached:
            pass
        finally:
            blocks[0] = first
        if catcher.hidden is None:
            raise LayerpressError(f"{self.staged.adapter.name}: the model's forward never reached its first block")
        return catcher

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run_to_first_block(input_ids).hidden

    def extras(self, batch_size: int, seqlen: int) -> BlockExtras:
        """The block extras for unpadded windows of this shape (they do not depend on the token values)."""
        dummy = torch.zeros(batch_size, seqlen, dtype=torch.long)
        return self._run_to_first_block(dummy).extras


def load_model(directory: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load any checkpoint layerpress reads or writes as a ready transformers model (eval mode, cache on).

    This is the loader for structurally pruned outputs, whose per-block shapes config.json alone cannot express
    (AutoModelForCausalLM.from_pretrained refuses them); for other checkpoints it gives the same model.
    """
    staged = StagedModel(Checkpoint(directory), torch.device(device), dtype)
    model = staged.materialize_all()
    model.tie_weights()
    model.config.use_cache = True
    if (Path(directory) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model
