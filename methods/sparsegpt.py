"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning in one column sweep with lazy block updates.

The mask is chosen per block of columns from the OBS saliency w² / [H⁻¹]_jj² (for N:M, every m columns and per row);
each pruned column's error is spread over the columns not yet visited through the row of the inverse-Hessian
Cholesky factor, so the remaining weights compensate for it. With a quantization target the same sweep prunes and
then quantizes every column, propagating both errors at once (joint compression, not two passes; methods/obs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .obs import HessianSweep


@dataclass
class SparseGPT(HessianSweep):
    name = "sparsegpt"
    summary = ("OBS pruning with weight updates from the inverse Hessian, joint with quantization when given "
               "--wbits (the most accurate, the slowest)")
