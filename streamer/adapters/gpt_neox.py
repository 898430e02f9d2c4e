"""GPT-NeoX / Pythia: fused query/key/value laid out head by head, partial rotary, parallel residual or not.

The checkpoint names the head `embed_out`, the model `lm_head`: StagedModel maps them by transformers' own renaming
rules, so the output keeps the checkpoint's name. `use_parallel_residual` only changes what the block adds up, not
the order its linear layers run in. `query_key_value` holds each head's queries, keys and values as one run of
3 · head_size rows (the attention reshapes with -1 heads), so a head is a unit structured pruning can remove.
"""

from .base import Adapter, ChannelGroup

GPT_NEOX = Adapter(
    name="gpt_neox",
    model_types=("gpt_neox",),
    blocks="gpt_neox.layers",
    final=("gpt_neox.final_layer_norm", "lm_head"),
    sequential_groups=(
        ("attention.query_key_value",),
        ("attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
    norms=("input_layernorm", "post_attention_layernorm"),
    bias_flags=("attention_bias",),
    channel_groups=(
        ChannelGroup("attention", ("attention.query_key_value",), "attention.dense", units_key="num_attention_heads"),
        ChannelGroup("mlp", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),
    ),
)
