"""Llama and the families transformers models the same way (Mistral, Qwen2): rotary embeddings, gated MLP."""

from .base import Adapter

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
    bias_flags=("attention_bias", "mlp_bias"),
)
