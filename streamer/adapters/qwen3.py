"""Qwen3: Llama's block with an RMSNorm on each head's queries and keys inside attention.

The q/k norms act per head (over head_dim), so they are the same whatever heads structured pruning keeps; they are
trained by --reconstruct norms like the block's other norms.
"""

from dataclasses import replace

from .llama import LLAMA

QWEN3 = replace(
    LLAMA,
    name="qwen3",
    model_types=("qwen3",),
    norms=(*LLAMA.norms, "self_attn.q_norm", "self_attn.k_norm"),
)
