"""BLOOM: ALiBi instead of positions, fused query/key/value projection, LayerNorm after the embeddings."""

from .base import Adapter

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
)
