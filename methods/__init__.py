"""Compression methods, one module each; see methods/base.py for the interface they implement."""

from __future__ import annotations

from .base import LayerResult, Method, Statistic, Target
from .gptq import GPTQ
from .magnitude import Magnitude
from .quant import QuantRecord, QuantSpec
from .rtn import RTN
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS: dict[str, type[Method]] = {method.name: method for method in (Magnitude, Wanda, SparseGPT, RTN, GPTQ)}

__all__ = ["LayerResult", "Method", "QuantRecord", "QuantSpec", "Statistic", "Target", "METHODS"]
