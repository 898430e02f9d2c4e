"""Compression methods, one module each; see methods/base.py for the interface they implement."""

from __future__ import annotations

from .base import LayerResult, Method, Statistic, Target
from .gblm import GBLM
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS: dict[str, type[Method]] = {method.name: method for method in (Magnitude, Wanda, SparseGPT, GBLM)}

__all__ = ["LayerResult", "Method", "Statistic", "Target", "METHODS"]
