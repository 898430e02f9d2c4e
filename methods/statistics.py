"""Accumulators of layer-input statistics, in float32 on the layer's device."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

from .base import Statistic

GRAM_DTYPES = ("auto", "float32", "tf32", "bfloat16")


def check_gram_dtype(gram_dtype: str) -> None:
    if gram_dtype not in GRAM_DTYPES:
        raise ValueError(f"the Gram matrix is accumulated in one of {', '.join(GRAM_DTYPES)}, not {gram_dtype!r}")


def resolve_gram_dtype(gram_dtype: str, dtype: torch.dtype) -> str:
    """"auto" rounds nothing: "tf32" for a block computing in bfloat16 or float16 (TF32 keeps 10 mantissa bits, so
    every 16-bit input is exact in it, and its products come out in float32; on a CPU it is float32), "float32" for
    float32. Not "bfloat16", whose products are rounded to bfloat16 a chunk at a time: an error relative to the
    Gram's norm, not its diagonal, which on SmolLM2's massive activations makes some Hessians indefinite (4 damping
    retries a run) and GPTQ w4 g128 act-order 6.6% worse (perplexity 37.48 -> 39.94, `--dtype bfloat16`)."""
    check_gram_dtype(gram_dtype)
    if gram_dtype != "auto":
        return gram_dtype
    return "tf32" if dtype in (torch.bfloat16, torch.float16) else "float32"


class Gram(Statistic):
    """H = 2·XᵀX / N over all N calibration tokens: the Hessian of the layer-wise loss ‖WX − ŴX‖² / N.

    gram_dtype says how each micro-batch's XᵀX is computed ("auto": by the layer's dtype, `resolve_gram_dtype`);
    it is always added to a float32 sum, and what is solved from it (Cholesky, inverse, sweep) stays float32:
    - "float32": the inputs in float32, one matrix product per micro-batch.
    - "tf32": the same with TF32 tensor cores allowed on CUDA for this product alone (10 of float32's 23 mantissa
      bits kept in the products); a CPU has no TF32, and there this is float32 exactly.
    - "bfloat16": the inputs rounded to bfloat16 (8 bits), multiplied BF16_CHUNK tokens at a time with float32
      accumulation inside the product (oneDNN on a CPU, cuBLAS on CUDA), each chunk's product rounded once to bfloat16
      and added to the float32 sum (its lower triangle only, in panels: see PANEL). torch returns a bfloat16 product
      in bfloat16, so the chunk bounds that rounding: its error grows as the square root of the tokens per chunk. On
      16384 tokens of 576 correlated features, relative Frobenius error against float64: float32 1.4e-7; the inputs'
      rounding alone 2.7e-4; bfloat16 in chunks of 512, 1024, 4096, 16384 tokens 4.3e-4, 5.3e-4, 8.7e-4, 1.75e-3. On
      this project's AVX512-BF16 CPU (no AMX) a bfloat16 product runs 2.0-2.2x faster than a float32 one.
    """

    BF16_CHUNK = 1024  # tokens per bfloat16 product: twice the inputs' own rounding error, within 10% of the speed
    # Columns per panel of a bfloat16 product, which makes only the panel's rows from its first column on (the
    # lower triangle; the upper is mirrored from it when the Gram is read). SmolLM2's inputs, 2 threads, 16384
    # tokens in chunks of 512: 576 columns 15.7 -> 14.1 ms, 1536 columns 83.2 -> 60.2 ms against whole panels.
    PANEL = 512

    def __init__(self, layer: nn.Linear, gram_dtype: str = "float32"):
        columns = layer.in_features
        self._sum = torch.zeros(columns, columns, dtype=torch.float32, device=layer.weight.device)
        self._symmetric = True  # False while only the lower triangle of _sum is up to date
        self.tokens = 0
        self.gram_dtype = resolve_gram_dtype(gram_dtype, layer.weight.dtype)

    def update(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1])
        if self.gram_dtype == "bfloat16":
            for chunk in flat.split(self.BF16_CHUNK):
                self._add_low_precision(chunk.to(torch.bfloat16))
        else:
            flat = flat.float()
            with tf32_products(flat.is_cuda and self.gram_dtype == "tf32"):
                self._sum.addmm_(flat.T, flat)
        self.tokens += flat.shape[0]

    def _add_low_precision(self, chunk: torch.Tensor) -> None:
        """The lower triangle of one chunk's XᵀX added to the sum, a panel of columns at a time (no wider than the
        chunk has tokens, so that the product and its float32 copy, which the CPU makes before adding, stay within
        the chunk's size). Each product is about half as much work as the whole matrix's."""
        width = self._panel(chunk.shape[0])
        with _exact_reductions(chunk.is_cuda):
            for start in range(0, chunk.shape[1], width):
                self._sum[start:, start : start + width].add_(chunk[:, start:].T @ chunk[:, start : start + width])
        self._symmetric = False

    @classmethod
    def _panel(cls, tokens: int) -> int:
        return max(min(cls.PANEL, tokens), 1)

    def _mirror(self) -> None:
        """Every entry above the diagonal copied from its twin below it, which every update has added to (the
        panels also make some of the entries above, as chunks of fewer tokens make other ones), a panel of columns
        at a time (no columns² temporary)."""
        columns, width = self._sum.shape[0], self.PANEL
        for start in range(0, columns, width):
            end = min(start + width, columns)
            self._sum[:start, start:end] = self._sum[start:end, :start].T
            square = self._sum[start:end, start:end]
            square.copy_(square.tril() + square.tril(-1).T)
        self._symmetric = True

    @classmethod
    def lower_entries(cls, columns: int, tokens: int = BF16_CHUNK) -> int:
        """Entries a bfloat16 update's products make per chunk of `tokens`: the panels' rows from their first
        column on."""
        width = cls._panel(tokens)
        return sum((columns - start) * min(width, columns - start) for start in range(0, columns, width))

    @classmethod
    def update_flops_per_token(cls, columns: int, gram_dtype: str = "float32") -> float:
        """2·n² per token in float32; in bfloat16 the lower triangle's panels (at 1024 tokens a chunk)."""
        return 2.0 * (cls.lower_entries(columns) if gram_dtype == "bfloat16" else columns * columns)

    @staticmethod
    def update_bytes_per_token(columns: int, dtype: torch.dtype, gram_dtype: str = "float32") -> int:
        """The transient bytes per token of the inputs of one `update`: in float32 a float32 copy of inputs of
        another dtype; in bfloat16, per chunk of at most BF16_CHUNK tokens, the inputs' bfloat16 copy (unless they
        are bfloat16), the product panel and its float32 copy (over-counted for micro-batches of more tokens: the
        chunks are made one at a time)."""
        if gram_dtype != "bfloat16":
            return 0 if dtype == torch.float32 else 4 * columns
        return (0 if dtype == torch.bfloat16 else 2 * columns) + (2 + 4) * columns

    @classmethod
    def update_moved_bytes_per_token(cls, columns: int, gram_dtype: str = "float32") -> float:
        """Memory traffic per token of the bfloat16 update beyond its products: every chunk writes and reads back
        its bfloat16 product (2 + 2 bytes per entry) and reads and writes the float32 sum (4 + 4), so 12 bytes per
        entry of the lower triangle's panels per BF16_CHUNK tokens. At 1024 tokens that is 6 bytes per 1,000 flops:
        on an A100 (1.5 TB/s, 200 TFLOP/s assumed) the traffic takes 80% as long as the products. A float32 update
        adds into the sum once per micro-batch, which is left out."""
        return 12.0 * cls.lower_entries(columns) / cls.BF16_CHUNK if gram_dtype == "bfloat16" else 0.0

    def combine(self, total: Callable[[torch.Tensor], torch.Tensor]) -> None:
        total(self._sum)
        self.tokens = total_count(total, self.tokens, self._sum.device)

    @property
    def gram(self) -> torch.Tensor:
        """XᵀX itself (not a copy): solvers scale it into their own working matrix, saving a copy of n² floats."""
        if not self._symmetric:
            self._mirror()
        return self._sum

    @property
    def scale(self) -> float:
        """H = scale · XᵀX."""
        return 2.0 / max(self.tokens, 1)

    @property
    def hessian(self) -> torch.Tensor:
        return self.gram * self.scale


def total_count(total: Callable[[torch.Tensor], torch.Tensor], count: int, device: torch.device) -> int:
    """A token count summed over the shares (through a tensor, as `total` sums tensors)."""
    return int(total(torch.tensor([count], dtype=torch.int64, device=device)).item())


def tf32_products(enabled: bool) -> AbstractContextManager:
    """Float32 products on CUDA in TF32 inside the block only (torch ≥ 2.9 spells it `fp32_precision`; mixing it
    with the older `allow_tf32` in one process is an error, so only the one this torch has is touched)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return _setting(matmul, "fp32_precision", "tf32", enabled)
    return _setting(matmul, "allow_tf32", True, enabled)


def _exact_reductions(enabled: bool) -> AbstractContextManager:
    """bfloat16 products on CUDA reduced in float32 throughout (cuBLAS may otherwise reduce split sums in
    bfloat16), inside the block only."""
    return _setting(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False, enabled)


@contextmanager
def _setting(owner: object, name: str, value: object, enabled: bool) -> Iterator[None]:
    """`owner.name` set to `value` inside the block, restored after it (nothing touched unless `enabled`)."""
    if not enabled:
        yield
        return
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


class ColumnNorms(Statistic):
    """‖X_j‖₂ for every input feature j over all calibration tokens."""

    def __init__(self, layer: nn.Linear):
        self._squares = torch.zeros(layer.in_features, dtype=torch.float32, device=layer.weight.device)

    def update(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        self._squares += flat.pow(2).sum(dim=0)

    def combine(self, total: Callable[[torch.Tensor], torch.Tensor]) -> None:
        total(self._squares)

    @property
    def norms(self) -> torch.Tensor:
        return self._squares.sqrt()


class Moments(Statistic):
    """Mean and variance of every input feature over all calibration tokens, in float64.

    Each micro-batch's own mean and sum of squared deviations are merged into the running ones with Chan et al.'s
    pairwise update, so no sum of squares of large activations is ever subtracted from another (the naive
    E[x²] − E[x]² loses every digit when |mean| ≫ std).
    """

    def __init__(self, layer: nn.Linear):
        shape, device = layer.in_features, layer.weight.device
        self.tokens = 0
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self._deviations = torch.zeros(shape, dtype=torch.float64, device=device)  # sum of (x − mean)²

    def update(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).double()
        count = flat.shape[0]
        if count == 0:
            return
        mean = flat.mean(dim=0)
        deviations = (flat - mean).pow(2).sum(dim=0)
        total = self.tokens + count
        delta = mean - self.mean
        self.mean += delta * (count / total)
        self._deviations += deviations + delta.pow(2) * (self.tokens * count / total)
        self.tokens = total

    def combine(self, total: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The shares' pooled moments: the mean from the summed Σx, the deviations from the pooled mean as each
        share's own plus its count times its mean's squared distance from the pooled one (Chan et al. again)."""
        tokens = total_count(total, self.tokens, self.mean.device)
        mean = total(self.mean * self.tokens) / max(tokens, 1)
        self._deviations = total(self._deviations + (self.mean - mean).pow(2) * self.tokens)
        self.mean, self.tokens = mean, tokens

    @property
    def variance(self) -> torch.Tensor:
        """Population variance (divided by the token count)."""
        return self._deviations / max(self.tokens, 1)

    @property
    def mean_square(self) -> torch.Tensor:
        """E[x²] = variance + mean²."""
        return self.variance + self.mean.pow(2)
