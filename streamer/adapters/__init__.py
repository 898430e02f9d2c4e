"""Model-family adapters, chosen from config.json's `model_type`."""

from __future__ import annotations

from ..errors import LayerpressError
from .base import Adapter
from .bloom import BLOOM
from .llama import LLAMA
from .opt import OPT

ADAPTERS: tuple[Adapter, ...] = (LLAMA, OPT, BLOOM)


def supported_model_types() -> list[str]:
    return sorted(t for adapter in ADAPTERS for t in adapter.model_types)


def adapter_for(config: dict) -> Adapter:
    """The adapter for a checkpoint's config.json, or one clear error naming what is supported."""
    model_type = config.get("model_type")
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    architectures = ", ".join(config.get("architectures") or []) or "none given"
    raise LayerpressError(
        f"unsupported architecture: model_type {model_type!r} (architectures: {architectures}); "
        f"supported model types: {', '.join(supported_model_types())}"
    )


__all__ = ["Adapter", "adapter_for", "supported_model_types", "ADAPTERS"]
