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


def lowest_overall(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` lowest scores of the whole tensor."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        mask[torch.topk(scores.flatten(), count, largest=False).indices] = True
    return mask.view_as(scores)


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
    whole matrix also sorts a copy of every score with its index (measured on CPU: 12 bytes a score)."""
    scores = rows * columns
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
