"""Llama and the families transformers models the same way (Mistral, Qwen2): rotary embeddings, gated MLP.

Attention reshapes with -1 heads, so a layer runs with any number of key/value groups; a unit is one key/value
head with the query heads sharing it, so the query-to-key/value ratio (num_key_value_groups) never changes.
"""

from .base import Adapter, ChannelGroup

LLAMA = Adapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    blocks="model.layers",
    final=("model.norm", "lm_head"),
    sequential_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    norms=("input_layernorm", "post_attention_layernorm"),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
    bias_flags=("attention_bias", "mlp_bias"),
    channel_groups=(
        ChannelGroup(
            "attention", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
            units_key="num_key_value_heads",
        ),
        ChannelGroup("mlp", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    ),
)
