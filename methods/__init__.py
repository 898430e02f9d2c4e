"""Compression methods, one module each; see methods/base.py for the interfaces they implement."""

from __future__ import annotations

from .base import LayerResult, Method, BaseMethod, Statistic, StructuredMethod, Target
from .flap import Flap
from .gblm import GBLM
from .gptq import GPTQ
from .magnitude import Magnitude
from .quant import QuantRecord, QuantSpec
from .rtn import RTN
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS: dict[str, type[BaseMethod]] = {
    method.name: method for method in (Magnitude, Wanda, SparseGPT, RTN, GPTQ, GBLM, Flap)
}

__all__ = [
    "LayerResult", "Method", "BaseMethod", "QuantRecord", "QuantSpec", "Statistic", "StructuredMethod", "Target",
    "METHODS",
]
