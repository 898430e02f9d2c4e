"""Choosing which weights to prune from a score per weight (lowest scores go)."""

from __future__ import annotations

import torch

from .base import Target


def lowest_in_rows(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask (True = prune) of the `count` lowest scores in every row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        mask.scatter_(1, torch.topk(scores, count, dim=1, largest=False).indices, True)
    return mask


TOPK_VALUES = 1 << 24  # above this many scores, the whole-tensor selection is by threshold, in chunks
SELECT_CHUNK_VALUES = 1 << 22  # scores per chunk of the threshold selection: its keys and counts, ~50 MiB
_HALF = 1 << 16  # a 32-bit key is found 16 bits at a time: 65536 counts per pass


def lowest_overall(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` lowest scores of the whole tensor.

    Up to TOPK_VALUES scores: on the CPU the k-th lowest by `kthvalue`, then every score below it and the first of
    those equal to it in flat order (`lowest_from_kth`), 2.8–3.2× faster than a top-k on SparseGPT's 128-column
    blocks (576 and 1536 rows, one thread: 1.2 against 3.7 ms, 3.9 against 10.9 ms), where the top-k was 42% of
    the sweep; elsewhere one top-k (GPU kernels not measured against each other yet: tools/gpu_check.py times
    both). Above TOPK_VALUES either needs a sorted copy of every score with its index (12 + 12·k/n bytes a score,
    29 GB for one OPT-175B fc2 at 70%), so the k-th lowest score is found exactly by counting
    (`lowest_by_threshold`), in chunks: a mask and one chunk."""
    if scores.numel() > TOPK_VALUES:
        return lowest_by_threshold(scores, count)
    if count <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if scores.device.type == "cpu":
        return lowest_from_kth(scores, count)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores.flatten(), count, largest=False).indices] = True
    return mask.view_as(scores)


def lowest_from_kth(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` (≥ 1) lowest scores: those below the k-th lowest, and of those equal to it the first in
    flat order (the tie rule of `lowest_by_threshold`); no value is read on the host."""
    flat = scores.reshape(-1)
    kth = torch.kthvalue(flat, min(count, flat.numel())).values
    mask = flat < kth
    ties = flat == kth
    mask |= ties & (ties.cumsum(0) <= count - mask.sum())
    return mask.view_as(scores)


def lowest_by_threshold(scores: torch.Tensor, count: int, chunk: int = SELECT_CHUNK_VALUES) -> torch.Tensor:
    """The same mask as a top-k of the `count` lowest, from a radix select over float32 scores: every score gets
    an int32 key ordered as the floats are; one pass counts the keys' high 16 bits, a second the low 16 bits of
    those in the k-th key's high bin, which gives the k-th key exactly; the third marks the keys below it and, of
    the keys equal to it, the first ones in flat order until `count` are marked (a top-k picks among exact ties
    in an unspecified order). Three reads of the scores, a few host reads in all."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if count <= 0:
        return mask.view_as(scores)
    if count >= flat.numel():
        return mask.fill_(True).view_as(scores)

    def keys(start: int) -> torch.Tensor:
        bits = flat[start : start + chunk].float().view(torch.int32)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: magnitude bits flipped, so ints sort as floats

    starts = range(0, flat.numel(), chunk)
    high_counts = sum(torch.bincount((keys(s) >> 16) + _HALF // 2, minlength=_HALF) for s in starts)
    high_cumulative = high_counts.cumsum(0)
    high = int(torch.searchsorted(high_cumulative, count))  # the first bin whose running count reaches `count`
    below = int(high_cumulative[high - 1]) if high > 0 else 0
    low_counts = torch.zeros(_HALF, dtype=torch.int64, device=scores.device)
    for start in starts:
        key = keys(start)
        low_counts += torch.bincount(key[(key >> 16) == high - _HALF // 2] & 0xFFFF, minlength=_HALF)
    low_cumulative = low_counts.cumsum(0)
    low = int(torch.searchsorted(low_cumulative, count - below))
    threshold = ((high - _HALF // 2) << 16) | low
    ties = count - below - (int(low_cumulative[low - 1]) if low > 0 else 0)  # equal to the k-th, still to mark
    for start in starts:
        key = keys(start)
        part = mask[start : start + chunk]
        part.copy_(key < threshold)
        if ties > 0:
            equal = key == threshold
            first = equal & (equal.cumsum(0) <= ties)
            part |= first
            ties -= int(first.sum())
    return mask.view_as(scores)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, chunk: int = SELECT_CHUNK_VALUES) -> float:
    """Σ values[mask] in float64, a chunk at a time. `values[mask].sum()` first lists the selected positions: for a
    2-D mask a k × 2 int64 index and a copy of the k values, 20 bytes a selected weight (4.5 GiB at 70% of OPT-66B
    fc2, most of what the score pass's measured peak had over its plan); here one chunk's zero-filled copy (16 MiB),
    and one host read."""
    flat_values, flat_mask = values.reshape(-1), mask.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=values.device)
    for start in range(0, flat_values.numel(), chunk):
        part = flat_values[start : start + chunk]
        total += torch.where(flat_mask[start : start + chunk], part, 0).sum(dtype=torch.float64)
    return float(total)


def n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask with the n lowest scores of every m consecutive columns of each row."""
    rows, columns = scores.shape
    groups = scores.reshape(rows, columns // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, largest=False).indices, True)
    return mask.view(rows, columns)


def check_pattern(target: Target, columns: int) -> None:
    if target.pattern is not None and columns % target.pattern[1]:
        n, m = target.pattern
        raise ValueError(f"{n}:{m} sparsity needs a multiple of {m} input features, the layer has {columns}")


def select(scores: torch.Tensor, target: Target, per_row: bool) -> torch.Tensor:
    """Prune mask for `target`: N:M groups if a pattern is set, else the target fraction per row or overall."""
    check_pattern(target, scores.shape[1])
    if target.pattern is not None:
        return n_of_m(scores, *target.pattern)
    if per_row:
        return lowest_in_rows(scores, int(scores.shape[1] * target.sparsity))
    return lowest_overall(scores, int(scores.numel() * target.sparsity))


def selection_bytes(rows: int, columns: int, target: Target, per_row: bool) -> int:
    """Peak bytes of `select` on a (rows, columns) score: the mask and top-k's values and indices; a top-k over a
    whole matrix also sorts a copy of every score with its index (measured on CPU: 12 bytes a score); above
    TOPK_VALUES the whole matrix is selected by threshold: the mask and one chunk's keys, counts and comparisons
    (`lowest_by_threshold`: under 24 bytes a chunk's score)."""
    scores = rows * columns
    if not per_row and target.pattern is None and scores > TOPK_VALUES:
        return scores + 24 * min(scores, SELECT_CHUNK_VALUES)
    fraction = target.pattern[0] / target.pattern[1] if target.pattern is not None else target.sparsity
    whole_sort = 0 if per_row or target.pattern is not None else 12 * scores
    return scores + int(12 * fraction * scores) + whole_sort


def select_count(rows: int, columns: int, target: Target, per_row: bool) -> int:
    """How many weights `select` prunes in a rows × columns layer."""
    if target.pattern is not None:
        n, m = target.pattern
        return rows * (columns // m) * n
    if per_row:
        return rows * int(columns * target.sparsity)
    return int(rows * columns * target.sparsity)
