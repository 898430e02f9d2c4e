"""Round-to-nearest: every weight onto the nearest point of its group's grid, the baseline GPTQ must beat."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .base import LayerCost, LayerResult, Method, Statistic, Target
from .quant import QuantRecord, round_to_nearest


@dataclass
class RTN(Method):
    name = "rtn"
    summary = "round-to-nearest quantization, no calibration data (needs --wbits)"
    prunes = False
    quantizes = True

    def check(self, target: Target) -> None:
        super().check(target)
        if target.quant is not None and target.quant.act_order:
            raise ValueError("rtn rounds every column independently: act-order changes nothing; leave it out")

    def pruned_count(self, rows: int, columns: int, target: Target) -> int:
        return 0

    def compress(self, layer: nn.Linear, statistic: Statistic | None, target: Target) -> LayerResult:
        self.check(target)
        record = round_to_nearest(layer.weight.detach(), target.quant)
        return LayerResult(record.dequantize(), info={}, quant=record)

    def layer_cost(self, rows: int, columns: int, dtype: torch.dtype, target: Target) -> LayerCost:
        """The generic working memory; the result keeps its grid record."""
        generic = super().layer_cost(rows, columns, dtype, target)
        return replace(generic, kept_bytes=QuantRecord.nbytes_for(rows, columns, target.quant, dtype))
