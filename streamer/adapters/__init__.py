"""Model-family adapters, chosen from config.json's `model_type`: declared ones, else one derived from the module
tree (streamer/adapters/derived.py)."""

from __future__ import annotations

import json
from functools import lru_cache

from ..errors import LayerpressError
from .base import Adapter
from .bloom import BLOOM
from .derived import NotDerivable, derive_adapter
from .falcon import FALCON
from .gemma import GEMMA2, GEMMA3
from .gpt_neox import GPT_NEOX
from .llama import LLAMA
from .mixtral import MIXTRAL
from .opt import OPT
from .phi3 import PHI3
from .qwen3 import QWEN3
from .qwen_moe import QWEN2_MOE, QWEN3_MOE

ADAPTERS: tuple[Adapter, ...] = (LLAMA, OPT, BLOOM, QWEN3, PHI3, GPT_NEOX, FALCON, GEMMA2, GEMMA3, MIXTRAL,
                                QWEN2_MOE, QWEN3_MOE)


def supported_model_types() -> list[str]:
    return sorted(t for adapter in ADAPTERS for t in adapter.model_types)


@lru_cache(maxsize=16)
def _derived(config_json: str) -> Adapter:
    config = json.loads(config_json)
    try:
        return derive_adapter(config)
    except NotDerivable as exc:
        architectures = ", ".join(config.get("architectures") or []) or "none given"
        raise LayerpressError(
            f"unsupported architecture: model_type {config.get('model_type')!r} (architectures: {architectures}) "
            f"has no declared adapter and none can be derived: {exc}; declared model types: "
            f"{', '.join(supported_model_types())}"
        ) from exc


def adapter_for(config: dict) -> Adapter:
    """The adapter for a checkpoint's config.json: the declared one for its model_type, else one derived from its
    module tree, or one clear error naming what is missing and what is declared."""
    model_type = config.get("model_type")
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter.for_config(config)
    if not model_type:
        raise LayerpressError(
            f"config.json names no model_type; declared model types: {', '.join(supported_model_types())}"
        )
    return _derived(json.dumps(config, sort_keys=True, default=str))


__all__ = ["Adapter", "adapter_for", "supported_model_types", "ADAPTERS"]
