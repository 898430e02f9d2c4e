"""BLOOM: ALiBi instead of positions, fused query/key/value projection, LayerNorm after the embeddings.

Structured pruning removes MLP channels only: the model builds one ALiBi tensor with a slope per head of the
config's head count and hands the same tensor to every block, so a block with fewer heads cannot be given the
slopes of the heads it kept.
"""

from .base import Adapter, ChannelGroup

BLOOM = Adapter(
    name="bloom",
    model_types=("bloom",),
    blocks="transformer.h",
    final=("transformer.ln_f", "lm_head"),
    sequential_groups=(
        ("self_attention.query_key_value",),
        ("self_attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
    norms=("input_layernorm", "post_attention_layernorm"),
    channel_groups=(ChannelGroup("mlp", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),),
)
