"""GPTQ (Frantar et al., 2023): quantize a layer column by column, the error of each column spread over the columns
not yet quantized through the inverse-Hessian Cholesky factor (OBQ with lazy block updates; methods/obs.py).

Groups are fitted when the sweep reaches them; act-order visits columns by descending Hessian diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

from .obs import HessianSweep


@dataclass
class GPTQ(HessianSweep):
    name = "gptq"
    summary = "quantization with weight updates from the inverse Hessian (needs --wbits)"
    prunes = False
