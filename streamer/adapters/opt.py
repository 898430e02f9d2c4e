"""OPT: learned positions, LayerNorm before (or, for 350m, after) each sub-layer, optional in/out projections.

Attention reshapes with its `num_heads` attribute, which structured pruning sets per layer.
"""

from .base import Adapter, ChannelGroup

OPT = Adapter(
    name="opt",
    model_types=("opt",),
    blocks="model.decoder.layers",
    final=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    sequential_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    norms=("self_attn_layer_norm", "final_layer_norm"),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
    bias_flags=("enable_bias",),
    channel_groups=(
        ChannelGroup(
            "attention", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.out_proj",
            units_key="num_attention_heads", head_attributes=(("self_attn.num_heads", "num_attention_heads"),),
        ),
        ChannelGroup("mlp", ("fc1",), "fc2"),
    ),
)
