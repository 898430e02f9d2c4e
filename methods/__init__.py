"""Compression methods, one module each; see methods/base.py for the interfaces they implement."""

from __future__ import annotations

from .base import LayerResult, Method, MethodOptions, Statistic, StructuredMethod, Target
from .flap import Flap
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS: dict[str, type[MethodOptions]] = {method.name: method for method in (Magnitude, Wanda, SparseGPT, Flap)}

__all__ = ["LayerResult", "Method", "MethodOptions", "Statistic", "StructuredMethod", "Target", "METHODS"]
