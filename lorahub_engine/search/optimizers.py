"""Gradient-free optimizers behind one ask/tell interface over the box [-bound, bound]^d.

    optimizer = make_optimizer(config, dimension)    # validated before anything is attached
    points = optimizer.ask(4)                         # [4, d] float64, inside the box
    optimizer.tell(losses)                            # one loss per asked point, in order
    optimizer.close()                                 # release it (and any thread it runs)

The search loop only sees `AskTellOptimizer`; another family of optimizers plugs in as another class that
`make_optimizer` returns. Today every name is a nevergrad optimizer (`nevergrad.optimizers.registry`), started at
w = 0 with `num_workers = population` and seeded through its parametrization's random state.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from lorahub_engine.search.config import SearchConfig
from lorahub_engine.search.errors import SearchError

COMMON = ("NGOpt", "CMA", "TwoPointsDE", "Cobyla", "OnePlusOne", "PSO", "RandomSearch")  # named in errors


class AskTellOptimizer(Protocol):
    def ask(self, n: int) -> np.ndarray:
        """n candidate weight vectors [n, d], inside the box."""

    def tell(self, losses: Sequence[float]) -> None:
        """The objective of each point of the last `ask`, in the same order."""

    def close(self) -> None:
        """Release the optimizer; it is not used afterwards."""


def make_optimizer(config: SearchConfig, dimension: int) -> AskTellOptimizer:
    """The optimizer `config.optimizer` names, for `dimension` weights."""
    return NevergradOptimizer(config, dimension)


class NevergradOptimizer:
    """A nevergrad optimizer on ng.p.Array(init=0, lower=-bound, upper=bound), budget and population from the
    config. NGOpt with population 1 and 20 weights selects COBYLA (as in LoraHub's released code)."""

    def __init__(self, config: SearchConfig, dimension: int):
        import nevergrad as ng  # ~1.5 s to import: only when a search runs

        # nevergrad hands scipy's COBYLA an end radius above its start radius for short budgets; scipy resets it
        # and warns from the optimizer's own thread (so no local catch_warnings can see it): harmless, silenced.
        warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND")

        registry = ng.optimizers.registry
        if config.optimizer not in registry:
            raise SearchError(_unknown(config.optimizer, registry))
        factory = registry[config.optimizer]
        if config.population > 1 and getattr(factory, "no_parallelization", False):  # checked before building
            raise SearchError(f"optimizer {config.optimizer!r} is sequential: it needs population=1, "
                              f"got {config.population}")
        parametrization = ng.p.Array(init=np.zeros(dimension), lower=-config.bound, upper=config.bound)
        parametrization.random_state = np.random.RandomState(config.seed)
        self._optimizer = factory(parametrization=parametrization, budget=config.budget,
                                  num_workers=config.population)
        self.name = config.optimizer
        self._asked: list = []

    def ask(self, n: int) -> np.ndarray:
        try:
            self._asked = [self._optimizer.ask() for _ in range(n)]
        except TypeError as e:
            failure = str(e)  # leave the except block first: its traceback would keep nevergrad's threads alive
        else:
            return np.stack([np.asarray(c.value, dtype=np.float64) for c in self._asked])  # [n, d]
        self.close()
        raise SearchError(
            f"nevergrad's {self.name} failed while proposing candidates ({failure}). nevergrad 1.0.12's meta-model "
            "(which NGOpt picks for population > 1, and for long budgets over few weights) breaks with numpy >= 2.4; "
            "use another optimizer, e.g. 'CMA' or 'TwoPointsDE'")

    def tell(self, losses: Sequence[float]) -> None:
        if len(losses) != len(self._asked):
            raise SearchError(f"got {len(losses)} losses for {len(self._asked)} asked candidates")
        for candidate, loss in zip(self._asked, losses):
            self._optimizer.tell(candidate, float(loss))
        self._asked = []

    def close(self) -> None:
        """Drop the nevergrad optimizer: recast optimizers (COBYLA, Powell) stop their thread when deleted."""
        self._optimizer = None
        self._asked = []


def _unknown(name: str, registry) -> str:
    close = difflib.get_close_matches(name, list(registry), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (f"unknown optimizer {name!r}{hint}. Valid names include {', '.join(COMMON)} "
            f"({len(registry)} in nevergrad.optimizers.registry)")
