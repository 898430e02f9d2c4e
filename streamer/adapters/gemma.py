"""Gemma 2 and Gemma 3 (text): Llama's projections with four norms per block and a soft-capped head.

What is particular to them lives outside the adapter's data or in it as one key: the embedding scaling (by
sqrt(hidden_size)) is part of the pre-block stage the model's own forward computes; sliding-window layers
alternate with global ones, so blocks are called with different masks (and, in Gemma 3, rotary tables), which the
call recorders keep per block (streamer/model.py); the head's logits are soft-capped (cap · tanh(logits / cap))
where the config sets `final_logit_softcapping`. Gemma 3 adds Qwen3-style q/k norms.
"""

from dataclasses import replace

from .llama import LLAMA

GEMMA2 = replace(
    LLAMA,
    name="gemma2",
    model_types=("gemma2",),
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    bias_flags=("attention_bias",),
    logit_softcap_key="final_logit_softcapping",
)

GEMMA3 = replace(
    GEMMA2,
    name="gemma3",
    model_types=("gemma3_text",),
    norms=(*GEMMA2.norms, "self_attn.q_norm", "self_attn.k_norm"),
)
