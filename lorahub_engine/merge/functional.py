"""Pure tensor functions of the task-arithmetic family: sparsify -> elect a sign -> weighted combine.

Index legend: n tasks stacked on dim 0; `...` is any task shape (a dW [out, in], a factor, KnOTS coordinates).
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

SignMethod = Literal["total", "frequency"]


class Sparsifier(Protocol):
    def __call__(self, tasks: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor: ...


def keep_count(density: float, numel: int) -> int:
    """Entries a task keeps: round(density * numel). (PEFT's int() drops one when the float product lands just
    below an integer, e.g. int(0.29 * 100) == 28.)"""
    return min(numel, round(density * numel))


def magnitude_prune(tasks: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each task's keep_count(density) largest-magnitude entries, zero the rest (TIES' trim step)."""
    flat = tasks.reshape(tasks.shape[0], -1)  # (n, m)
    keep = keep_count(density, flat.shape[1])
    if keep == flat.shape[1]:
        return tasks
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.abs().topk(keep, dim=1, sorted=False).indices, True)
    return (flat * mask).reshape(tasks.shape)


def dare_drop(tasks: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry independently with probability 1 - density, rescale survivors by 1 / density."""
    keep = torch.rand(tasks.shape, generator=generator, dtype=tasks.dtype) < density
    return tasks * keep / density


def majority_sign(tasks: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """Elected sign per entry, +1 or -1 (+1 on a tie): sign of the summed mass ("total") or of the summed signs
    ("frequency") over the n tasks. (n, ...) -> (...)"""
    votes = tasks.sum(0) if method == "total" else tasks.sign().sum(0)
    return torch.where(votes >= 0, 1.0, -1.0).to(tasks.dtype)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Mean over the tasks whose entry agrees with the elected sign; 0 where none does. (n, ...) -> (...)"""
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine(
    tasks: torch.Tensor,
    weights: torch.Tensor,
    *,
    sparsify: Sparsifier | None,
    consensus: SignMethod | None,
    density: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The whole family in one function. tasks (n, ...), weights (n,) -> merged (...).

    Each task is sparsified on its own; the sign is elected on the sparsified, unweighted tasks; the weights multiply
    the tasks; then either a plain sum (no consensus) or the disjoint mean over entries that agree with the elected
    sign (an entry that is exactly 0 never agrees). Callers that want the election to see the weights pass
    pre-weighted tasks and unit weights.
    """
    if sparsify is not None:
        tasks = sparsify(tasks, density, generator)
    weighted = tasks * weights.to(tasks.dtype).view(-1, *[1] * (tasks.dim() - 1))
    if consensus is None:
        return weighted.sum(0)
    return disjoint_mean(weighted, tasks.sign() == majority_sign(tasks, consensus))
