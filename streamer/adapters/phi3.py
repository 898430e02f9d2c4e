"""Phi-3: fused query/key/value (`qkv_proj`) and gate/up (`gate_up_proj`) projections, compressed as one layer each.

Structured pruning is refused: a head's channels lie in three row ranges of `qkv_proj` (queries, keys, values one
after another) and an MLP channel in two of `gate_up_proj` (gate, then up), so no unit is one run of rows.
"""

from .base import Adapter

PHI3 = Adapter(
    name="phi3",
    model_types=("phi3",),
    blocks="model.layers",
    final=("model.norm", "lm_head"),
    sequential_groups=(
        ("self_attn.qkv_proj",),
        ("self_attn.o_proj",),
        ("mlp.gate_up_proj",),
        ("mlp.down_proj",),
    ),
    norms=("input_layernorm", "post_attention_layernorm"),
    unprunable="the fused qkv_proj and gate_up_proj hold each head's and each MLP channel's rows in separate ranges",
)
