"""Falcon: fused query/key/value with multi-query or grouped key/values, attention and MLP in parallel.

The 40B/180B layout (`new_decoder_architecture`) normalizes the block's input twice (`ln_attn`, `ln_mlp`); the older
one once (`input_layernorm`), or, without parallel attention, before each sub-layer: the adapter names every norm,
and each config's block has its own. Rotary or ALiBi positions are whatever the model's forward passes the blocks.

Structured pruning removes MLP channels only: the fused projection interleaves each key/value group's query heads
with its key and value, the attention reshapes with the config's head counts, and ALiBi has one slope per head of
the config (as in BLOOM).
"""

from .base import Adapter, ChannelGroup

FALCON = Adapter(
    name="falcon",
    model_types=("falcon",),
    blocks="transformer.h",
    final=("transformer.ln_f", "lm_head"),
    sequential_groups=(
        ("self_attention.query_key_value",),
        ("self_attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
    norms=("input_layernorm", "post_attention_layernorm", "ln_attn", "ln_mlp"),
    bias_flags=("bias",),
    channel_groups=(ChannelGroup("mlp", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),),
)
