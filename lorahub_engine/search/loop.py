"""The search loop: ask the optimizer, evaluate its candidates in one batched forward, tell it the losses (or, for
optimizer="adam", descend the gradient: descent.py).

    check_search(config, N)                          # before anything is attached
    history = search_history(objective, config)     # every Evaluation, in order

`objective`: anything with `num_adapters` and `cross_entropy(weights [P, N]) -> [P]` (FewShotObjective, a fold).
"""

from __future__ import annotations

import numpy as np
import torch

from lorahub_engine.progress import progress_bar
from lorahub_engine.search.config import GRADIENT, SearchConfig
from lorahub_engine.search.descent import descend
from lorahub_engine.search.objective import l1_penalty
from lorahub_engine.search.optimizers import AskTellOptimizer, make_optimizer
from lorahub_engine.search.result import Evaluation


def check_search(config: SearchConfig, num_adapters: int) -> None:
    """Fails (SearchError) on an optimizer that cannot run this config, before anything is attached."""
    if config.optimizer != GRADIENT:
        make_optimizer(config, num_adapters).close()


def search_history(objective, config: SearchConfig, progress: bool = True) -> list[Evaluation]:
    """Every evaluation of one search of `config` on `objective` (the optimizer built and released here), in all
    `config.history_length`. start="single" spends the first N evaluations on the one-hot weights (each adapter
    alone, one batched forward) and starts the optimizer at the best of them; optimizer="adam" records each step."""
    if config.optimizer == GRADIENT:
        return descend(objective, config.descent(), progress)
    N, start, history = objective.num_adapters, None, []
    if config.start == "single":
        history = evaluate(objective, torch.eye(N, dtype=torch.float64)[:config.budget], config.l1)
        if len(history) == config.budget:
            return history
        start = np.array(min(history, key=lambda e: e.loss).weights)
        config = config.replace(budget=config.budget - len(history))
    search = make_optimizer(config, N, start)
    try:
        return history + run_search(search, objective, config, progress)
    finally:
        search.close()


def run_search(search: AskTellOptimizer, objective, config: SearchConfig,
               progress: bool = True) -> list[Evaluation]:
    """Ask / evaluate / tell until `config.budget` evaluations; each round evaluates up to the optimizer's
    population at once."""
    history: list[Evaluation] = []
    with progress_bar(total=config.budget, desc="lorahub search", unit="eval", progress=progress) as bar:
        while len(history) < config.budget:
            points = torch.from_numpy(search.ask(min(search.population, config.budget - len(history))))  # [P, N]
            evaluations = evaluate(objective, points, config.l1)
            search.tell([e.loss for e in evaluations])
            history += evaluations
            bar.update(len(points))
            bar.set_postfix(best=f"{min(e.loss for e in history):.4f}")
    return history


def evaluate(objective, weights: torch.Tensor, l1: float) -> list[Evaluation]:
    """weights [P, N] evaluated in one batched forward: loss = CE + l1 * mean |w| per candidate."""
    cross_entropy = objective.cross_entropy(weights).double().cpu()  # [P]
    losses = cross_entropy + l1_penalty(weights, l1)
    return [Evaluation(tuple(w), loss, ce) for w, loss, ce in zip(weights.tolist(), losses.tolist(),
                                                                 cross_entropy.tolist())]
