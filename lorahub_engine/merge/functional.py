"""Pure tensor functions of the task-arithmetic family: sparsify -> elect a sign -> weighted combine.

Index legend: n tasks stacked on dim 0; `...` is any task shape (a dW [out, in], a factor, KnOTS coordinates).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch

SignMethod = Literal["total", "frequency"]
BLOCK_ELEMENTS = 2**23  # entries of one (n, rows, ...) block in `combine`: 32 MiB in fp32


class KeepMask(Protocol):
    def __call__(self, task: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
        """One task (...) -> bool mask (...) of the entries it keeps."""


def keep_count(density: float, numel: int) -> int:
    """Entries a task keeps: round(density * numel). (PEFT's int() drops one when the float product lands just
    below an integer, e.g. int(0.29 * 100) == 28.)"""
    return min(numel, round(density * numel))


def magnitude_keep(task: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """TIES' trim: keep the keep_count(density) largest-magnitude entries of one task."""
    flat = task.reshape(-1)
    keep = torch.zeros(flat.shape, dtype=torch.bool)
    keep[flat.abs().topk(keep_count(density, flat.numel()), sorted=False).indices] = True
    return keep.reshape(task.shape)


def dare_keep(task: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop: keep each entry independently with probability density (survivors are rescaled by the caller)."""
    return torch.rand(task.shape, generator=generator, dtype=task.dtype) < density


def majority_sign(tasks: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """Elected sign per entry, +1 or -1 (+1 on a tie): sign of the summed mass ("total") or of the summed signs
    ("frequency") over the n tasks. (n, ...) -> (...)"""
    votes = tasks.sum(0) if method == "total" else tasks.sign().sum(0)
    return torch.where(votes >= 0, 1.0, -1.0).to(tasks.dtype)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Mean over the tasks whose entry agrees with the elected sign; 0 where none does. (n, ...) -> (...)"""
    return torch.where(agree, weighted, 0).sum(0) / agree.sum(0).clamp(min=1)


def weighted_consensus(tasks: torch.Tensor, weights: torch.Tensor, consensus: SignMethod | None) -> torch.Tensor:
    """tasks (n, ...), weights (n,) -> the weighted sum (no consensus), or the disjoint mean of the weighted tasks
    over the entries whose sign agrees with the one elected on the unweighted tasks (an exact 0 never agrees)."""
    weighted = tasks * weights.to(tasks.dtype).view(-1, *[1] * (tasks.dim() - 1))
    if consensus is None:
        return weighted.sum(0)
    return disjoint_mean(weighted, tasks.sign() == majority_sign(tasks, consensus))


def combine(
    task_rows: Callable[[int, slice], torch.Tensor],
    n: int,
    rows: int,
    weights: torch.Tensor,
    *,
    keep: KeepMask | None,
    rescale: bool,
    consensus: SignMethod | None,
    density: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The whole family in one function: task i's rows r are task_rows(i, r), a (len(r), ...) tensor.

    Each task is sparsified on its own (keep mask, survivors / density when `rescale`; masks drawn in task order);
    then `weighted_consensus` runs block by block over the rows, all entrywise, so at most one block of the n tasks
    and their n bool masks are in memory, never the n dense tasks at once. Callers that want the sign election to
    see the weights pass pre-weighted tasks and unit weights. Returns the merged (rows, ...).
    """
    masks = [keep(task_rows(i, slice(None)), density, generator) for i in range(n)] if keep else None
    first = task_rows(0, slice(0, 1))  # (1, ...)
    out = torch.empty(rows, *first.shape[1:], dtype=first.dtype)
    step = max(1, BLOCK_ELEMENTS // (n * first.numel()))
    for start in range(0, rows, step):
        r = slice(start, start + step)
        tasks = torch.stack([task_rows(i, r) for i in range(n)])  # (n, rows in r, ...)
        if masks is not None:
            tasks = tasks * torch.stack([m[r] for m in masks])
            if rescale:
                tasks /= density
        out[r] = weighted_consensus(tasks, weights, consensus)
    return out
