"""Choose with the shots themselves what the shots cannot tell apart: k-fold (default leave-one-out) validation.

    choice = cross_validate(objective, run, length=40, folds=None)     # None: leave-one-out
    choice.kind       # "search" (then choice.l1, choice.evaluations), "zero" (w = 0) or "single" (choice.adapter)

For each fold (shots split into k parts, one held out), a run (a search, or a gradient fit) goes on the other
shots for each l1 of the grid; after each fraction of its length, the best candidate so far (by its training
objective) is scored on the held-out shots. Every candidate is evaluated on all n shots in its forward (per-example losses), so the held-out scores cost
no extra forward. The search's held-out cross-entropy, averaged over folds, is compared with two fallbacks scored the
same way: w = 0 (the base) and the best single adapter (one-hot weight 1, chosen on the fold's training shots).
The lowest wins; ties go to the fallback (the simpler answer).
Index legend: P candidates, N adapters, n shots.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lorahub_engine.search.errors import SearchError
from lorahub_engine.search.objective import FewShotObjective
from lorahub_engine.search.result import Evaluation

L1_GRID = (0.05, 0.5)  # LoraHub's l1, and ten times it
FRACTIONS = (0.25, 0.5, 1.0)  # of the budget: the numbers of evaluations compared


@dataclass(frozen=True)
class Choice:
    """What validation picked and the held-out mean CE of every option it compared (JSON-ready)."""

    kind: str  # "search", "zero" or "single"
    l1: float | None  # search: the regularization picked
    evaluations: int | None  # search: the number of evaluations (search) or steps (fit) picked
    adapter: int | None  # single: the adapter's index, chosen on all shots
    held_out: dict  # option name -> mean held-out CE over folds

    def to_json(self) -> dict:
        return {"kind": self.kind, "l1": self.l1, "evaluations": self.evaluations, "adapter": self.adapter,
                "held_out": self.held_out}


def folds_of(n: int, k: int | None) -> list[np.ndarray]:
    """k folds of shot indices 0..n-1 (contiguous, sizes differing by at most 1); None or k >= n: leave-one-out."""
    k = n if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise SearchError(f"validation needs at least 2 folds, got {k!r}")
    if n < 2:
        raise SearchError(f"validation needs at least 2 examples, got {n}")
    return list(np.array_split(np.arange(n), min(k, n)))


class _FoldObjective:
    """The objective restricted to a fold's training shots; remembers every candidate's held-out CE."""

    def __init__(self, objective: FewShotObjective, train: np.ndarray, held: np.ndarray):
        self.objective, self.train, self.held = objective, torch.as_tensor(train), torch.as_tensor(held)
        self.num_adapters = objective.num_adapters
        self.held_out: list[float] = []  # per evaluated candidate, in order

    def cross_entropy(self, weights: torch.Tensor, grad: bool = False) -> torch.Tensor:
        losses = self.objective.example_losses(weights, grad)  # [P, n]
        self.held_out += losses[:, self.held].detach().mean(-1).tolist()
        return losses[:, self.train].mean(-1)


def cross_validate(objective: FewShotObjective, run: Callable[[object, float], list[Evaluation]], length: int,
                   folds: int | None = None, l1_grid: Sequence[float] = L1_GRID,
                   fractions: Sequence[float] = FRACTIONS) -> Choice:
    """Pick (l1, number of evaluations) for a run on all shots, or a fallback, by held-out CE over folds.

    run(fold_objective, l1) -> the run's evaluations in order (a search's, or a gradient fit's steps), `length`
    of them; after each fraction of `length`, the best so far by its training objective is scored held-out.
    """
    n, N = objective.num_examples, objective.num_adapters
    splits = folds_of(n, folds)
    lengths = sorted({max(1, math.ceil(f * length)) for f in fractions})
    base_and_singles = objective.example_losses(torch.cat([torch.zeros(1, N), torch.eye(N)]))  # [1 + N, n]
    held: dict[str, list[float]] = {"zero": [], "single": []}
    for fold in splits:
        train = np.setdiff1d(np.arange(n), fold)
        held["zero"].append(float(base_and_singles[0, fold].mean()))
        best = int(base_and_singles[1:, train].mean(-1).argmin())
        held["single"].append(float(base_and_singles[1 + best, fold].mean()))
        for l1 in l1_grid:
            fold_objective = _FoldObjective(objective, train, fold)
            history = run(fold_objective, l1)
            for t in lengths:
                first = min(range(t), key=lambda i: history[i].loss)  # best by the training objective
                held.setdefault(_name(l1, t), []).append(fold_objective.held_out[first])
    means = {name: float(np.mean(v)) for name, v in held.items()}
    winner = min(means, key=lambda name: (means[name], name not in ("zero", "single")))
    if winner == "zero":
        return Choice("zero", None, None, None, means)
    if winner == "single":
        return Choice("single", None, None, int(base_and_singles[1:].mean(-1).argmin()), means)
    l1, t = next((l1, t) for l1 in l1_grid for t in lengths if _name(l1, t) == winner)
    return Choice("search", l1, t, None, means)


def _name(l1: float, evaluations: int) -> str:
    return f"l1={l1:g} evaluations={evaluations}"
