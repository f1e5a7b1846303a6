"""Choose with the shots themselves what the shots cannot tell apart: k-fold (default leave-one-out) validation.

    choice = cross_validate(objective, run, length=40, folds=None, answers=HeldOutAnswers(...))  # None: LOO
    choice.kind       # "search" (then choice.l1, choice.evaluations), "zero" (w = 0) or "single" (choice.adapter)

For each fold (shots split into k parts, one held out), a run (a search, or a gradient fit) goes on the other
shots for each l1 of the grid; after each fraction of its length, the best candidate so far (by its training
objective) is an option. Two fallbacks are options too: w = 0 (the base) and the best single adapter (one-hot weight
1, chosen by CE on the fold's training shots). Every option is scored on the fold's held-out shots:
- cross-entropy: every candidate is evaluated on all n shots in its forward (per-example losses), so it costs no
  extra forward;
- exact match (with `answers`, validate="exact_match"): the held-out shots' greedy answers under every (fold,
  option), all in one batched generate (answers.py), scored by normalized exact match.
Each score is averaged over the shots of a fold, then over folds. The winner answers most held-out shots right,
cross-entropy breaking ties (without `answers`: the lowest cross-entropy alone); ties left go to the fallback, w = 0
first, then the single adapter. With `prefer_fallbacks` (validate="exact_match_fallback") a tie on exact match goes
to the fallbacks before cross-entropy is read: a search must answer more held-out shots right than w = 0 to win. Held-out CE rewards moving toward the answers' format, not getting them right: on
the tiny base it never chose w = 0, even where zero-shot beats every search (benchmarks/RESULTS.md).
Index legend: P candidates, N adapters, n shots, R (fold, option, held-out shot) rows.
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
FALLBACKS = ("zero", "single")  # in the order they win ties, before any search


@dataclass(frozen=True)
class Choice:
    """What validation picked and the held-out scores of every option it compared (JSON-ready)."""

    kind: str  # "search", "zero" or "single"
    l1: float | None  # search: the regularization picked
    evaluations: int | None  # search: the number of evaluations (search) or steps (fit) picked
    adapter: int | None  # single: the adapter's index, chosen on all shots
    held_out: dict  # option name -> {"exact_match": mean held-out share answered right (None: not scored),
    #                                 "cross_entropy": mean held-out CE}, means over folds

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
                   fractions: Sequence[float] = FRACTIONS, answers=None, prefer_fallbacks: bool = False) -> Choice:
    """Pick (l1, number of evaluations) for a run on all shots, or a fallback, by held-out scores over folds.

    run(fold_objective, l1) -> the run's evaluations in order (a search's, or a gradient fit's steps), `length`
    of them; after each fraction of `length`, the best so far by its training objective is an option.
    answers: anything with exact_match(weights [R, N], rows) -> R bools (a HeldOutAnswers over the objective's
    examples): rank by held-out exact match first; None: by held-out cross-entropy alone. prefer_fallbacks: on
    equal exact match the fallbacks win before cross-entropy is compared.
    """
    n, N = objective.num_examples, objective.num_adapters
    splits = folds_of(n, folds)
    lengths = sorted({max(1, math.ceil(f * length)) for f in fractions})
    base_and_singles = objective.example_losses(torch.cat([torch.zeros(1, N), torch.eye(N)]))  # [1 + N, n]
    options: dict[str, list[tuple[torch.Tensor, float]]] = {"zero": [], "single": []}  # per fold: (weights [N], CE)
    for fold in splits:
        train = np.setdiff1d(np.arange(n), fold)
        options["zero"].append((torch.zeros(N), float(base_and_singles[0, fold].mean())))
        best = int(base_and_singles[1:, train].mean(-1).argmin())
        options["single"].append((torch.eye(N)[best], float(base_and_singles[1 + best, fold].mean())))
        for l1 in l1_grid:
            fold_objective = _FoldObjective(objective, train, fold)
            history = run(fold_objective, l1)
            for t in lengths:
                first = min(range(t), key=lambda i: history[i].loss)  # best by the training objective
                options.setdefault(option_name(l1, t), []).append((torch.tensor(history[first].weights, dtype=torch.float32),
                                                             fold_objective.held_out[first]))
    hits = None if answers is None else _exact_match(answers, options, splits)
    held = {name: {"exact_match": None if hits is None else hits[name],
                   "cross_entropy": float(np.mean([ce for _, ce in per_fold]))} for name, per_fold in options.items()}
    winner = best_option(held, prefer_fallbacks)
    if winner == "zero":
        return Choice("zero", None, None, None, held)
    if winner == "single":
        return Choice("single", None, None, int(base_and_singles[1:].mean(-1).argmin()), held)
    l1, t = next((l1, t) for l1 in l1_grid for t in lengths if option_name(l1, t) == winner)
    return Choice("search", l1, t, None, held)


def _exact_match(answers, options: dict[str, list[tuple[torch.Tensor, float]]],
                 splits: list[np.ndarray]) -> dict[str, float]:
    """Per option, the share of held-out shots answered right, averaged over each fold's shots then over folds;
    every (option, fold, held-out shot) is one row of one batched generate."""
    rows = [(name, f, int(e)) for name in options for f, fold in enumerate(splits) for e in fold]
    weights = torch.stack([options[name][f][0] for name, f, _ in rows])  # [R, N]
    right = answers.exact_match(weights, [e for _, _, e in rows])
    per_fold: dict[tuple[str, int], list[bool]] = {}
    for (name, f, _), hit in zip(rows, right):
        per_fold.setdefault((name, f), []).append(hit)
    # rounded: equal shares reached through different folds must tie exactly, so that cross-entropy decides
    return {name: round(float(np.mean([np.mean(per_fold[name, f]) for f in range(len(splits))])), 12)
            for name in options}


def best_option(held: dict, prefer_fallbacks: bool = False) -> str:
    """The winning option of held-out scores {name: {"exact_match", "cross_entropy"}}: more held-out answers right
    (when scored), then the lower held-out CE, then the fallbacks in FALLBACKS' order before any search; with
    prefer_fallbacks the fallbacks' order comes before the CE."""
    def rank(name: str) -> tuple:
        right, ce = held[name]["exact_match"], held[name]["cross_entropy"]
        order = FALLBACKS.index(name) if name in FALLBACKS else len(FALLBACKS)
        return (0.0 if right is None else -right, *((order, ce) if prefer_fallbacks else (ce, order)))
    return min(held, key=rank)  # min keeps the first of equal keys


def option_name(l1: float, evaluations: int) -> str:
    """The name of a search option in `Choice.held_out`."""
    return f"l1={l1:g} evaluations={evaluations}"
