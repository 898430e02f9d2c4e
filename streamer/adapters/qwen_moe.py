"""Qwen2-MoE and Qwen3-MoE: Qwen's attention with a mixture of experts in place of the MLP.

As in Mixtral (streamer/adapters/mixtral.py), each expert's gate, up and down projections are compressible layers
of their own, observed on the tokens the router sends them; the router (`mlp.gate`) is compressed only with
--compress-router. Qwen2-MoE adds a shared expert that sees every token (`mlp.shared_expert.*`, compressed like a
dense MLP) and its gate (`mlp.shared_expert_gate`, one output: kept as it is, like the router). Qwen3-MoE has no
shared expert and Qwen3's q/k norms. Both families may mix dense and expert blocks (`mlp_only_layers`,
`decoder_sparse_step`); such checkpoints are refused in one line. No structured pruning, for Mixtral's reason.
"""

from dataclasses import replace

from .base import EXPERT, ExpertLayout
from .llama import LLAMA
from .mixtral import MIXTRAL

ATTENTION_GROUPS = LLAMA.sequential_groups[:2]
QWEN_EXPERTS = ExpertLayout(path="mlp.experts", count_keys=("num_experts", "num_local_experts"), gate="gate_proj",
                            up="up_proj", down="down_proj", router="mlp.gate",
                            every_block=(("decoder_sparse_step", 1), ("mlp_only_layers", [])))
EXPERT_GROUPS = ((f"mlp.experts.{EXPERT}.gate_proj", f"mlp.experts.{EXPERT}.up_proj"),
                 (f"mlp.experts.{EXPERT}.down_proj",))
SHARED_INPUTS = (ATTENTION_GROUPS[0], EXPERT_GROUPS[0])  # q/k/v; each expert's gate and up

QWEN2_MOE = replace(
    MIXTRAL,
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    sequential_groups=(
        *ATTENTION_GROUPS,
        ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", *EXPERT_GROUPS[0]),
        ("mlp.shared_expert.down_proj", *EXPERT_GROUPS[1]),
    ),
    shared_inputs=(*SHARED_INPUTS, ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")),
    experts=QWEN_EXPERTS,
)

QWEN3_MOE = replace(
    MIXTRAL,
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    sequential_groups=(*ATTENTION_GROUPS, *EXPERT_GROUPS),
    norms=(*MIXTRAL.norms, "self_attn.q_norm", "self_attn.k_norm"),
    shared_inputs=SHARED_INPUTS,
    experts=QWEN_EXPERTS,
)
