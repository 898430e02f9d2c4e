"""A transformers model whose weights stay on disk: only the stage being processed is materialized.

The skeleton is built from config.json with transformers' own class on the meta device. Its parameters are replaced
by real tensors stage by stage (pre-block stage, one block, final stage) and turned back into meta tensors when the
stage is done, so memory holds one stage at a time whatever the depth of the model.

How a block is called is not written down per family: the model's own forward is run with call recorders in place
of the blocks, which record the arguments (masks, rotary tables, ALiBi, position ids) the model passes to each.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers import AutoConfig, GenerationConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key

from . import hostmemory
from .adapters import Adapter, adapter_for
from .checkpoint import Checkpoint
from .errors import LayerpressError
from .experts import linear_router
from .structure import GroupLayout, Skeleton, build_skeleton


@dataclass
class BlockExtras:
    """Everything a block's forward takes besides the hidden states, as the model itself passes it."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LinearLayer:
    """A compressible linear layer: its full module path, its block, its name in the block, its weight count."""

    name: str
    block: int
    linear: str
    params: int


class _LastBlockReached(Exception):
    pass


class _BlockOutput(tuple):
    """What a call recorder returns in place of a block: a 1-tuple holding the hidden states, so that models that
    take a block's output whole (transformers 5 layers) and those that take its first item (Falcon) both pass the
    hidden states on to the next recorder unchanged."""


class _CallRecorder(nn.Module):
    """Stands in for one block: records how the model calls it and passes the hidden states on unchanged; the
    recorder of the last block stops the forward.

    Every block is recorded, because the call may differ per block: Gemma gives sliding-window layers another mask
    (and Gemma 3 other rotary tables) than global ones. Arguments equal between blocks stay shared objects.
    """

    def __init__(self, last: bool) -> None:
        super().__init__()
        self.last = last
        self.hidden: torch.Tensor | None = None
        self.extras: BlockExtras | None = None

    def forward(self, hidden: torch.Tensor | _BlockOutput, *args: Any, **kwargs: Any) -> _BlockOutput:
        hidden = hidden[0] if isinstance(hidden, _BlockOutput) else hidden
        self.hidden = hidden
        self.extras = BlockExtras(args, kwargs)
        if self.last:
            raise _LastBlockReached
        return _BlockOutput((hidden,))


def renamed_checkpoint_names(model: PreTrainedModel, checkpoint_names: list[str]) -> dict[str, str]:
    """Model name -> checkpoint name for the checkpoint tensors that transformers' own renaming rules for this
    model class rename on loading (GPT-NeoX checkpoints store the head as `embed_out`, the model calls it
    `lm_head`), so that layerpress reads and writes the checkpoint's own names."""
    renamings = [rule for rule in get_model_conversion_mapping(model) if isinstance(rule, WeightRenaming)]
    renamed = {}
    for name in checkpoint_names:
        model_name = rename_source_key(name, renamings, [])[0]
        if model_name != name:
            renamed[model_name] = name
    return renamed


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

    def __init__(
        self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype | None = None, add_biases: bool = False,
        compress_router: bool = False,
    ):
        """add_biases: set the family's bias flags (Adapter.bias_flags), so that the block's linear layers get bias
        tensors; the ones the checkpoint lacks start at zero and are new output tensors (see `config_changes`).
        compress_router: a mixture of experts' router is one of the compressible layers (a LinearRouter)."""
        self.checkpoint = checkpoint
        self.compress_router = compress_router
        self.device = device
        self.dtype = dtype or checkpoint_dtype(checkpoint)
        try:
            config = AutoConfig.from_pretrained(checkpoint.directory)
        except (ValueError, KeyError, OSError) as exc:
            raise LayerpressError(f"cannot read the model config in {checkpoint.directory}: {exc}") from exc
        config.use_cache = False
        self.adapter: Adapter = adapter_for(checkpoint.config)
        if compress_router:
            self.adapter = self.adapter.with_router()
        self.config_changes = {
            flag: True for flag in self.adapter.bias_flags if add_biases and getattr(config, flag, True) is not True
        }
        skeleton = self._skeleton(config)
        before = set(skeleton.model.state_dict())
        if self.config_changes:
            for flag, value in self.config_changes.items():
                setattr(config, flag, value)
            skeleton = self._skeleton(config)
        self.model = skeleton.model
        self.layouts: dict[str, GroupLayout] = skeleton.layouts
        self.config = config
        self.blocks: nn.ModuleList = self.model.get_submodule(self.adapter.blocks)
        self._names: dict[str, str] = {}
        self._new: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}  # checkpoint name -> (dtype, shape)
        self._read_ahead: dict[str, torch.Tensor] = {}  # read for the output copy, kept for the pre-block stage
        self._renamed = renamed_checkpoint_names(self.model, list(checkpoint.entries))
        for name, tensor in self.model.state_dict().items():
            self._names[name] = self._new_name(name, tensor) if name not in before else self._checkpoint_name(name)
        self._check_modules()

    def _skeleton(self, config) -> Skeleton:
        """The model of `config` on the meta device (with the per-block shapes of a structurally pruned checkpoint),
        its real buffers (rotary tables) on the compute device."""
        skeleton = build_skeleton(config, self.dtype)
        if self.compress_router:
            for block in skeleton.blocks:
                linear_router(block, self.adapter.experts)
        skeleton.model.eval().requires_grad_(False)
        for module in skeleton.model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(self.device)
        return skeleton

    # ---------------------------------------------------------------- names
    def _checkpoint_name(self, name: str) -> str:
        entries = self.checkpoint.entries
        prefix = self.model.base_model_prefix + "."
        if name in entries:
            return name
        if name in self._renamed:
            return self._renamed[name]
        if name.startswith(prefix) and name[len(prefix) :] in entries:
            return name[len(prefix) :]  # checkpoints saved from the base model (facebook/opt-*, bigscience/bloom)
        tied = getattr(self.model, "_tied_weights_keys", None)
        if isinstance(tied, dict) and name in tied and getattr(self.config, "tie_word_embeddings", True):
            return self._checkpoint_name(tied[name])
        raise LayerpressError(
            f"checkpoint {self.checkpoint.directory} lacks tensor {name!r} that its {self.adapter.name} config needs"
        )

    def _new_name(self, name: str, tensor: torch.Tensor) -> str:
        """The output name of a tensor the config changes added: beside its module's checkpoint tensors."""
        module, _, leaf = name.rpartition(".")
        sibling = next((known for known in self._names if known.rpartition(".")[0] == module), None)
        if sibling is None or not name.startswith(self.adapter.blocks + "."):
            raise LayerpressError(f"{self.adapter.name}: config changes {self.config_changes} add {name}, "
                                  "which is not beside a block tensor of the checkpoint")
        checkpoint_name = self._names[sibling].rpartition(".")[0] + "." + leaf
        self._new[checkpoint_name] = (self.checkpoint.entries[self._names[sibling]].dtype, tuple(tensor.shape))
        return checkpoint_name

    def _check_modules(self) -> None:
        block = self.blocks[0]
        for name in self.adapter.linear_names:
            if not isinstance(block.get_submodule(name), nn.Linear):
                raise LayerpressError(f"{self.adapter.name} block has no linear layer {name!r}")
        if self.adapter.norms and not self.adapter.block_norms(block):
            raise LayerpressError(
                f"{self.adapter.name} block has none of the normalization layers {self.adapter.norms}"
            )

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_prefix(self, index: int) -> str:
        return f"{self.adapter.blocks}.{index}."

    def block_names(self, index: int) -> list[str]:
        """Model state-dict names of block `index`."""
        prefix = self.block_prefix(index)
        return [name for name in self._names if name.startswith(prefix)]

    def tensor_spec(self, checkpoint_name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of an output tensor: the checkpoint's, or that of a tensor the config changes added."""
        if checkpoint_name in self._new:
            return self._new[checkpoint_name]
        entry = self.checkpoint.entries[checkpoint_name]
        return entry.dtype, tuple(entry.shape)

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

    def linear_weight_names(self, index: int) -> dict[str, str]:
        """Block `index`'s compressible linear layers (adapter names) -> checkpoint names of their weights."""
        prefix = self.block_prefix(index)
        return {name: self._names[f"{prefix}{name}.weight"] for name in self.adapter.linear_names}

    def uncompressed_linear_modules(self) -> list[str]:
        """Module paths of the model's linear layers outside the compressed ones (e.g. the head)."""
        compressed = {f"{self.block_prefix(i)}{name}" for i in range(self.num_blocks)
                      for name in self.adapter.linear_names}
        return [name for name, module in self.model.named_modules()
                if isinstance(module, nn.Linear) and name not in compressed]

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

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors' bytes from disk, keyed by checkpoint name (touches no module: fine on a thread).
        Tensors the config changes added are not on disk: `place` makes them."""
        wanted = [name for name in dict.fromkeys(self.checkpoint_names(names)) if name not in self._new]
        kept = {name: self._read_ahead.pop(name) for name in wanted if name in self._read_ahead}
        return {**kept, **self.checkpoint.read([name for name in wanted if name not in kept])}

    def read_for_copy(self, checkpoint_name: str) -> torch.Tensor:
        """A tensor outside the blocks, read to be copied to the output as it is; what the pre-block stage needs of
        it (the embeddings) is kept for that stage, which comes next, so that every input byte is read once."""
        tensor = self.checkpoint.read([checkpoint_name])[checkpoint_name]
        if checkpoint_name in self.checkpoint_names(self.pre_stage_names()):
            self._read_ahead[checkpoint_name] = tensor
        return tensor

    def place(self, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
        """Put tensors read by `read` into the skeleton on the device, floating ones in the compute dtype (tensors
        the config changes added start at zero)."""
        for name in names:
            checkpoint_name = self._names[name]
            if checkpoint_name in self._new:
                tensor = torch.zeros(self._new[checkpoint_name][1], dtype=self._new[checkpoint_name][0])
            else:
                tensor = tensors[checkpoint_name]
            dtype = self.dtype if tensor.dtype.is_floating_point else tensor.dtype
            self._set(name, tensor.to(device=self.device, dtype=dtype))

    def materialize(self, names: list[str]) -> None:
        self.place(names, self.read(names))

    def release(self, names: list[str]) -> None:
        """Turn the named tensors back into meta tensors, freeing their memory."""
        state = self.model.state_dict(keep_vars=True)
        for name in names:
            self._set(name, torch.empty_like(state[name], device="meta"))

    def read_block(self, index: int) -> dict[str, torch.Tensor]:
        return self.read(self.block_names(index))

    def load_block(self, index: int, tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Materialize block `index` (from `tensors` if `read_block` already read them) and return it."""
        self.place(self.block_names(index), self.read_block(index) if tensors is None else tensors)
        return self.blocks[index]

    def materialize_all(self) -> PreTrainedModel:
        """Every tensor read onto the device: the whole model, for use outside the block stream."""
        self.materialize(list(self._names))
        return self.model

    def release_block(self, index: int) -> None:
        """Free block `index` and give its memory back to the OS (streamer/hostmemory.py: else host memory grows
        with the number of blocks)."""
        self.release(self.block_names(index))
        hostmemory.trim()

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """Block `index`'s tensors under their checkpoint names, in the checkpoint's dtypes, on the CPU."""
        state = self.model.state_dict(keep_vars=True)
        out = {}
        for name in self.block_names(index):
            target = self.tensor_spec(self._names[name])[0]
            out[self._names[name]] = state[name].detach().to(device="cpu", dtype=target)
        return out

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for name in self.adapter.linear_names}

    def layer_name(self, index: int, linear: str) -> str:
        """The full module path of a linear layer of block `index`, as records and logs name it."""
        return f"{self.adapter.blocks}.{index}.{linear}"

    def linear_layers(self) -> list[LinearLayer]:
        """Every compressible linear layer of the model in forward order (shapes from the meta skeleton)."""
        return [
            LinearLayer(self.layer_name(index, name), index, name, layer.weight.numel())
            for index, block in enumerate(self.blocks)
            for name, layer in self.linears(block).items()
        ]

    # ---------------------------------------------------------------- stages
    def _final_modules(self) -> list[nn.Module]:
        modules = []
        for path in self.adapter.final:
            parent, _, leaf = path.rpartition(".")
            module = getattr(self.model.get_submodule(parent) if parent else self.model, leaf, None)
            if module is not None:
                modules.append(module)
        return modules

    def final_stage_names(self) -> list[str]:
        """Model state-dict names of what follows the last block (final norm, head)."""
        names = []
        for path in self.adapter.final:
            names += [n for n in self._names if n.startswith(path + ".")]
        return names

    def pre_stage_names(self) -> list[str]:
        """Model state-dict names of what the model computes before its first block (embeddings, positions)."""
        final = set(self.final_stage_names())
        return [n for n in self._names if not n.startswith(self.adapter.blocks + ".") and n not in final]

    @contextmanager
    def pre_stage(self) -> Iterator[Embedder]:
        """Materialize everything the model computes before its first block (embeddings, positions)."""
        names = self.pre_stage_names()
        self.materialize(names)
        try:
            yield Embedder(self)
        finally:
            self.release(names)

    @contextmanager
    def final_stage(self) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Materialize what follows the last block (final norm, head); yields hidden states -> logits."""
        names = self.final_stage_names()
        self.materialize(names)
        modules = self._final_modules()
        key = self.adapter.logit_softcap_key
        cap = getattr(self.config, key, None) if key else None

        def logits(hidden: torch.Tensor) -> torch.Tensor:
            for module in modules:
                hidden = module(hidden)
            return cap * torch.tanh(hidden / cap) if cap else hidden

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

    def _record_block_calls(self, input_ids: torch.Tensor) -> list[_CallRecorder]:
        blocks = self.staged.blocks
        originals = list(blocks)
        recorders = [_CallRecorder(last=index == len(blocks) - 1) for index in range(len(blocks))]
        for index, recorder in enumerate(recorders):
            blocks[index] = recorder
        try:
            with torch.no_grad():
                self.staged.model(input_ids=input_ids.to(self.staged.device), use_cache=False)
        except _LastBlockReached:
            pass
        finally:
            for index, block in enumerate(originals):
                blocks[index] = block
        missing = [index for index, recorder in enumerate(recorders) if recorder.extras is None]
        if missing:
            raise LayerpressError(f"{self.staged.adapter.name}: the model's forward never called block {missing[0]}")
        return recorders

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._record_block_calls(input_ids)[0].hidden

    def extras(self, batch_size: int, seqlen: int) -> list[BlockExtras]:
        """Each block's extras for unpadded windows of this shape (they do not depend on the token values)."""
        dummy = torch.zeros(batch_size, seqlen, dtype=torch.long)
        return [recorder.extras for recorder in self._record_block_calls(dummy)]


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
