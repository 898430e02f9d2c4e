"""Output formats: which tensors a compressed linear layer is written as, and how they are read back.

The writer plans every shard before the first block is compressed, so a format must tell, from a layer's name,
dtype, shape and target alone (a `LayerPlan`), exactly which tensors it writes; `encode` then fills them from the
method's result and `decode` turns them back into the dense weight, bit for bit what `--format dense` writes.

- dense: the weight as is (fake-quantized in its dtype when quantized), loadable by transformers.
- packed: compressed-tensors' `pack-quantized` layout, which transformers, vLLM and the compressed-tensors package
  read (config.json gets the matching `quantization_config`):
    weight_packed      int32 (rows, ⌈cols·bits/32⌉): every row's integers as one little-endian bit stream
                       (value j in bits j·bits … j·bits+bits−1; 32 values fill exactly `bits` words)
    weight_scale       (rows, groups) in the compute dtype
    weight_zero_point  int32 (⌈rows·bits/32⌉, groups): zero points packed the same way along the rows
                       (asymmetric only)
    weight_g_idx       int32 (cols,): group of every column (act-order "group" only)
    weight_shape       int64 (2,): rows, cols
  Integers are stored offset by 2^(bits−1) from compressed-tensors' signed ones, i.e. as our unsigned q.
  Every layer is sized from its own plan's grid, so layers may differ in bits (`compress --bits-policy`).
- sparse: our own layout for pruned layers, whose size is known before the maths because every method prunes an
  exact number of weights (`Method.pruned_count`):
    weight_bitmask     uint8 (rows, ⌈cols/8⌉): bit j%8 (least significant first) of byte j//8 is 1 where the
                       weight is kept; padding bits are 0
    weight_values      (kept,) in the weight's dtype: the kept weights in row-major order (no quantization), or
    weight_packed      int32 (⌈kept·bits/32⌉,): their grid integers as one bit stream, in row-major order, with
                       weight_scale, weight_zero_point and weight_g_idx as in `packed` (quantization)
    weight_shape       int64 (2,)
  A kept weight may be zero; pruned ones are exactly 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from methods import LayerResult, QuantSpec
from methods.quant import contiguous_groups, read_grid

from .errors import LayerpressError
from .writer import TensorSpec

WORD_BITS = 32


def packed_words(count: int, bits: int) -> int:
    return -(-count * bits // WORD_BITS)


# Values packed or unpacked at once: the int64 working copies stay at 8 bytes a value of this many (256 MiB), not of
# the whole layer (6.6 GB for BLOOM-176B's dense_4h_to_h), wherever the integers are.
PACK_CHUNK_VALUES = 2**25


def _by_row_chunks(convert, tensor: torch.Tensor, count: int) -> torch.Tensor:
    """convert(rows of tensor) over chunks of rows holding about PACK_CHUNK_VALUES values each, concatenated."""
    step = max(1, PACK_CHUNK_VALUES // max(count, 1))
    if tensor.shape[0] <= step:
        return convert(tensor)
    return torch.cat([convert(tensor[start : start + step]) for start in range(0, tensor.shape[0], step)])


def pack_bits(ints: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack every row of unsigned integers (rows, n) < 2^bits into int32 words (rows, ⌈n·bits/32⌉), densely."""
    return _by_row_chunks(lambda part: _pack_rows(part, bits), ints, ints.shape[1])


def _pack_rows(ints: torch.Tensor, bits: int) -> torch.Tensor:
    rows, count = ints.shape
    chunks = -(-count // WORD_BITS)
    values = torch.zeros(rows, chunks * WORD_BITS, dtype=torch.int64, device=ints.device)
    values[:, :count] = ints
    values = values.view(rows, chunks, WORD_BITS)
    words = torch.zeros(rows, chunks, bits, dtype=torch.int64, device=ints.device)
    for index in range(WORD_BITS):  # 32 values fill exactly `bits` words
        word, offset = divmod(index * bits, WORD_BITS)
        words[:, :, word] |= (values[:, :, index] << offset) & 0xFFFFFFFF
        if offset + bits > WORD_BITS:
            words[:, :, word + 1] |= values[:, :, index] >> (WORD_BITS - offset)
    words = words.view(rows, chunks * bits)[:, : packed_words(count, bits)]
    return (words - (words >> 31 << 32)).to(torch.int32)  # two's complement


def unpack_bits(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The unsigned integers (rows, count), uint8, that `pack_bits` packed into `words` (rows, ⌈count·bits/32⌉)."""
    return _by_row_chunks(lambda part: _unpack_rows(part, bits, count), words, count)


def _unpack_rows(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    rows = words.shape[0]
    chunks = -(-count // WORD_BITS)
    padded = torch.zeros(rows, chunks * bits, dtype=torch.int64, device=words.device)
    padded[:, : words.shape[1]] = words.to(torch.int64) & 0xFFFFFFFF
    padded = padded.view(rows, chunks, bits)
    values = torch.empty(rows, chunks, WORD_BITS, dtype=torch.int64, device=words.device)
    low_mask = (1 << bits) - 1
    for index in range(WORD_BITS):
        word, offset = divmod(index * bits, WORD_BITS)
        value = padded[:, :, word] >> offset
        if offset + bits > WORD_BITS:
            value |= padded[:, :, word + 1] << (WORD_BITS - offset)
        values[:, :, index] = value & low_mask
    return values.view(rows, -1)[:, :count].to(torch.uint8)


def pack_mask(kept: torch.Tensor) -> torch.Tensor:
    """Bool (rows, cols) to the bitmask layout: uint8 (rows, ⌈cols/8⌉), least significant bit first."""
    rows, columns = kept.shape
    padded = torch.zeros(rows, -(-columns // 8) * 8, dtype=torch.int32, device=kept.device)
    padded[:, :columns] = kept
    weights = 1 << torch.arange(8, dtype=torch.int32, device=kept.device)
    return (padded.view(rows, -1, 8) * weights).sum(dim=2).to(torch.uint8)


def unpack_mask(bitmask: torch.Tensor, columns: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.to(torch.int32).unsqueeze(2) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :columns].bool()


@dataclass(frozen=True)
class LayerPlan:
    """What the output stage knows of a compressed linear layer's weight before any maths.

    name: checkpoint name of the weight (ends with "weight"); dtype, shape: its dtype and shape in the checkpoint;
    scale_dtype: the compute dtype, in which quantization scales are fitted; quant: its grid, if quantized;
    kept: how many weights the method keeps (None: it cannot say).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, int]
    scale_dtype: torch.dtype
    quant: QuantSpec | None = None
    kept: int | None = None

    def part(self, suffix: str) -> str:
        """The name of one of the layer's tensors: "...q_proj.weight" -> "...q_proj.weight_<suffix>"."""
        return f"{self.name}_{suffix}"


class Format(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    parts: ClassVar[tuple[str, ...]] = ()  # suffixes of the tensors a layer may be written as

    def check(self, plan: LayerPlan) -> None:
        """Raise LayerpressError when this layer cannot be written in this format (before any work is done)."""

    @abstractmethod
    def specs(self, plan: LayerPlan) -> list[TensorSpec]:
        """The tensors the layer is written as, in write order."""

    @abstractmethod
    def encode(self, plan: LayerPlan, weight: torch.Tensor, result: LayerResult) -> dict[str, torch.Tensor]:
        """Those tensors, from the dense weight in its checkpoint dtype and the method's result."""

    def decode(self, plan: LayerPlan, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The dense weight back from `encode`'s tensors (keyed by suffix)."""
        raise NotImplementedError(f"{self.name} layers are the weights themselves")


class Dense(Format):
    name = "dense"
    summary = "the weights in their dtype (fake-quantized when quantized); loads with transformers as is"

    def specs(self, plan: LayerPlan) -> list[TensorSpec]:
        return [TensorSpec(plan.name, plan.dtype, plan.shape)]

    def encode(self, plan: LayerPlan, weight: torch.Tensor, result: LayerResult) -> dict[str, torch.Tensor]:
        return {plan.name: weight}


def grid_specs(plan: LayerPlan) -> list[TensorSpec]:
    """weight_scale, weight_zero_point (asymmetric), weight_g_idx (groups in act order) of a quantized layer."""
    spec = plan.quant
    rows, columns = plan.shape
    groups = spec.groups(columns)
    specs = [TensorSpec(plan.part("scale"), plan.scale_dtype, (rows, groups))]
    if not spec.symmetric:
        specs.append(TensorSpec(plan.part("zero_point"), torch.int32, (packed_words(rows, spec.bits), groups)))
    if spec.permuted_groups:
        specs.append(TensorSpec(plan.part("g_idx"), torch.int32, (columns,)))
    return specs


def grid_tensors(plan: LayerPlan, result: LayerResult) -> dict[str, torch.Tensor]:
    record = result.quant
    tensors = {plan.part("scale"): record.scale}
    if not plan.quant.symmetric:
        tensors[plan.part("zero_point")] = pack_bits(record.zero.T, plan.quant.bits).T.contiguous()
    if plan.quant.permuted_groups:
        tensors[plan.part("g_idx")] = record.g_idx.to(torch.int32)
    return tensors


def read_grid_parts(
    plan: LayerPlan, tensors: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, zero points uint8, g_idx) from the tensors `grid_tensors` wrote."""
    spec, (rows, columns) = plan.quant, plan.shape
    scale = tensors["scale"]
    if spec.symmetric:
        zero = torch.full(scale.shape, (spec.maxq + 1) // 2, dtype=torch.uint8)
    else:
        zero = unpack_bits(tensors["zero_point"].T.contiguous(), spec.bits, rows).T
    g_idx = tensors["g_idx"].long() if "g_idx" in tensors else contiguous_groups(columns, spec)
    return scale, zero, g_idx


def shape_spec(plan: LayerPlan) -> TensorSpec:
    return TensorSpec(plan.part("shape"), torch.int64, (2,))


def shape_tensor(plan: LayerPlan) -> torch.Tensor:
    return torch.tensor(plan.shape, dtype=torch.int64)


class Packed(Format):
    name = "packed"
    summary = "compressed-tensors pack-quantized (int32-packed integers, scales, zero points); needs --wbits"
    parts = ("packed", "scale", "zero_point", "g_idx", "shape")

    def check(self, plan: LayerPlan) -> None:
        if plan.quant is None:
            raise LayerpressError("--format packed stores quantized integers: give --wbits")
        groupsize, columns = plan.quant.groupsize, plan.shape[1]
        if groupsize is not None and columns % groupsize:
            raise LayerpressError(
                f"--format packed (compressed-tensors) needs --groupsize to divide every layer's input features: "
                f"{plan.name} has {columns}, not a multiple of {groupsize}"
            )

    def specs(self, plan: LayerPlan) -> list[TensorSpec]:
        rows, columns = plan.shape
        packed = TensorSpec(plan.part("packed"), torch.int32, (rows, packed_words(columns, plan.quant.bits)))
        return [packed, *grid_specs(plan), shape_spec(plan)]

    def encode(self, plan: LayerPlan, weight: torch.Tensor, result: LayerResult) -> dict[str, torch.Tensor]:
        packed = pack_bits(result.quant.ints, plan.quant.bits)
        return {plan.part("packed"): packed, **grid_tensors(plan, result), plan.part("shape"): shape_tensor(plan)}

    def decode(self, plan: LayerPlan, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        scale, zero, g_idx = read_grid_parts(plan, tensors)
        ints = unpack_bits(tensors["packed"], plan.quant.bits, plan.shape[1])
        return read_grid(ints, scale, zero, g_idx).to(plan.dtype)


class Sparse(Format):
    name = "sparse"
    summary = "bitmask of the kept weights plus their values (or packed integers with --wbits); needs pruning"
    parts = ("bitmask", "values", "packed", "scale", "zero_point", "g_idx", "shape")

    def check(self, plan: LayerPlan) -> None:
        if plan.kept is None:
            raise LayerpressError("--format sparse needs a method that says how many weights it prunes")
        if plan.kept == plan.shape[0] * plan.shape[1]:
            raise LayerpressError("--format sparse stores pruned layers: give --sparsity or --pattern")

    def specs(self, plan: LayerPlan) -> list[TensorSpec]:
        rows, columns = plan.shape
        specs = [TensorSpec(plan.part("bitmask"), torch.uint8, (rows, -(-columns // 8)))]
        if plan.quant is None:
            specs.append(TensorSpec(plan.part("values"), plan.dtype, (plan.kept,)))
        else:
            specs += [TensorSpec(plan.part("packed"), torch.int32, (packed_words(plan.kept, plan.quant.bits),)),
                      *grid_specs(plan)]
        return [*specs, shape_spec(plan)]

    def encode(self, plan: LayerPlan, weight: torch.Tensor, result: LayerResult) -> dict[str, torch.Tensor]:
        kept = ~result.mask.cpu()
        if int(kept.sum()) != plan.kept:
            raise RuntimeError(f"{plan.name}: the method kept {int(kept.sum())} weights, it announced {plan.kept}")
        tensors = {plan.part("bitmask"): pack_mask(kept)}
        if plan.quant is None:
            tensors[plan.part("values")] = weight[kept]
        else:
            ints = result.quant.ints.cpu()[kept].unsqueeze(0)
            tensors[plan.part("packed")] = pack_bits(ints, plan.quant.bits)[0]
            tensors.update(grid_tensors(plan, result))
        tensors[plan.part("shape")] = shape_tensor(plan)
        return tensors

    def decode(self, plan: LayerPlan, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        kept = unpack_mask(tensors["bitmask"], plan.shape[1])
        if plan.quant is None:
            weight = torch.zeros(plan.shape, dtype=plan.dtype)
            weight[kept] = tensors["values"]
            return weight
        scale, zero, g_idx = read_grid_parts(plan, tensors)
        ints = zero[:, g_idx].clone()  # pruned weights sit on the zero point: exactly 0
        ints[kept] = unpack_bits(tensors["packed"].unsqueeze(0), plan.quant.bits, int(kept.sum()))[0]
        return read_grid(ints, scale, zero, g_idx).to(plan.dtype)


FORMATS: dict[str, Format] = {fmt.name: fmt for fmt in (Dense(), Packed(), Sparse())}


def compressed_tensors_config(specs: dict[str, QuantSpec], ignore: list[str]) -> dict:
    """The `quantization_config` block of config.json that makes a packed output loadable by compressed-tensors.

    specs: every compressed module's grid, by module path. One grid for all is one group targeting every Linear
    (ignore: the linear modules left uncompressed); mixed grids (per-layer bits) get one group per grid, each
    targeting its modules by name.
    """
    by_spec: dict[QuantSpec, list[str]] = {}
    for module, spec in specs.items():
        by_spec.setdefault(spec, []).append(module)
    uniform = len(by_spec) == 1
    groups = {
        f"group_{index}": {"targets": ["Linear"] if uniform else modules, "weights": grid_scheme(spec),
                           "input_activations": None, "output_activations": None, "format": "pack-quantized"}
        for index, (spec, modules) in enumerate(sorted(by_spec.items(), key=lambda item: item[0].bits))
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def grid_scheme(spec: QuantSpec) -> dict:
    """compressed-tensors' description of a weight grid."""
    weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "dynamic": False,
               "strategy": "channel" if spec.groupsize is None else "group"}
    if spec.groupsize is not None:
        weights["group_size"] = spec.groupsize
    if spec.act_order is not None:
        weights["actorder"] = spec.act_order
    return weights
