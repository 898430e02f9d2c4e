"""What layerpress needs to know of a model family, declared as data.

Everything else is derived from transformers' own model classes: the pre-block stage (embeddings, positions,
rotary tables, ALiBi, masks) is whatever the model's forward computes before it calls its first block, captured
at run time (see streamer/model.py). So an adapter only names where the blocks are, what follows them, and which
linear layers a block has, in the order its forward uses them.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    norms: the block's normalization layers, relative to the block (trained by --reconstruct norms).
    bias_flags: config.json flags that give the block's linear layers biases (set by --reconstruct biases so that
        the output, with its new bias tensors, loads in transformers); flags a family's config lacks are ignored.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    final: tuple[str, ...]
    sequential_groups: tuple[tuple[str, ...], ...]
    norms: tuple[str, ...] = ()
    bias_flags: tuple[str, ...] = ()

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential_groups for name in group)
