"""Mixtral: Mistral's attention with a mixture of experts in place of the MLP.

The router (`mlp.gate`; the checkpoint's `block_sparse_moe.gate`) is compressed only with --compress-router. Each
expert's three matrices (`w1` gate, `w3` up, `w2` down, as the checkpoint stores them) are compressible layers of
their own, built unfused (streamer/experts.py): their statistics come from the tokens the router sends to the
expert, or, for an expert that receives fewer than --expert-min-tokens, from every calibration token
(streamer/block.py). No structured pruning: transformers' fused experts have one intermediate width for all, which
the output must keep to load.
"""

from .base import EXPERT, Adapter, ExpertLayout

MIXTRAL = Adapter(
    name="mixtral",
    model_types=("mixtral",),
    blocks="model.layers",
    final=("model.norm", "lm_head"),
    sequential_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        (f"mlp.experts.{EXPERT}.w1", f"mlp.experts.{EXPERT}.w3"),
        (f"mlp.experts.{EXPERT}.w2",),
    ),
    norms=("input_layernorm", "post_attention_layernorm"),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   (f"mlp.experts.{EXPERT}.w1", f"mlp.experts.{EXPERT}.w3")),
    experts=ExpertLayout(path="mlp.experts", count_keys=("num_local_experts",), gate="w1", up="w3", down="w2",
                          router="mlp.gate"),
    unprunable="transformers' fused experts hold one intermediate width for all experts, so no expert can lose "
    "channels alone",
)
