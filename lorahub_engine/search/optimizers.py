"""Gradient-free optimizers behind one ask/tell interface over the box [-bound, bound]^d.

    optimizer = make_optimizer(config, dimension)    # validated before anything is attached
    points = optimizer.ask(optimizer.population)      # [P, d] float64, inside the box
    optimizer.tell(losses)                            # one loss per asked point, in order
    optimizer.close()                                 # release it (and any thread it runs)

"cma" is pycma's CMA-ES (its own population, step `config.step`); with mode="fusion" it folds the sign symmetry
of LoraHub's factor merge (w and -w give the same composition: each candidate is replaced by whichever of w, -w
is closer to the search's mean). Every other name is a nevergrad optimizer (`nevergrad.optimizers.registry`),
with `num_workers = population` and seeded through its parametrization's random state.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from lorahub_engine.search.config import SearchConfig
from lorahub_engine.search.errors import SearchError

COMMON = ("cma", "NGOpt", "CMA", "TwoPointsDE", "Cobyla", "OnePlusOne", "PSO", "RandomSearch")  # named in errors


class AskTellOptimizer(Protocol):
    population: int  # points asked per round (the last round may ask fewer)

    def ask(self, n: int) -> np.ndarray:
        """n candidate weight vectors [n, d], inside the box (n <= population)."""

    def tell(self, losses: Sequence[float]) -> None:
        """The objective of each point of the last `ask`, in the same order."""

    def close(self) -> None:
        """Release the optimizer; it is not used afterwards."""


def make_optimizer(config: SearchConfig, dimension: int, start: np.ndarray | None = None) -> AskTellOptimizer:
    """The optimizer `config.optimizer` names, for `dimension` weights, started at `start` (default: as
    `config.start` says; the search loop passes the best single adapter for start="single")."""
    if config.optimizer == "cma":
        return CMAOptimizer(config, dimension, start)
    return NevergradOptimizer(config, dimension, start)


def start_point(config: SearchConfig, dimension: int, rng: np.random.Generator) -> np.ndarray:
    """w = 0 (LoraHub; also the placeholder of start="single") or a random point uniform in [-step, step]^d."""
    if config.start != "random":
        return np.zeros(dimension)
    width = min(config.step, config.bound)
    return rng.uniform(-width, width, dimension)


class CMAOptimizer:
    """pycma's CMA-ES in the box (BoundTransform), its random numbers from a seeded numpy Generator."""

    def __init__(self, config: SearchConfig, dimension: int, start: np.ndarray | None = None):
        import cma

        rng = np.random.default_rng(config.seed)
        default = 4 + int(3 * math.log(dimension))  # pycma's own population size
        self.population = min(config.population or default, config.budget)
        self.fold = config.fold and config.mode == "fusion"
        options = {"bounds": [-config.bound, config.bound], "popsize": max(self.population, 2), "seed": np.nan,
                   "randn": lambda *shape: rng.standard_normal(shape), "verbose": -9, "tolfun": 0, "tolx": 1e-8,
                   "CMA_mirrors": 0}
        x0 = start_point(config, dimension, rng) if start is None else start
        self._es = cma.CMAEvolutionStrategy(x0, config.step, options)
        self._asked: np.ndarray | None = None

    def ask(self, n: int) -> np.ndarray:
        points = np.asarray(self._es.ask(), dtype=np.float64)  # [popsize, d]
        if self.fold:  # the closer of w and -w to the mean: the same composition, one mode instead of two
            mean = self._es.mean
            flip = np.sum(points * mean, axis=1) < 0
            points[flip] *= -1
        self._asked = points
        return points[:n].copy()

    def tell(self, losses: Sequence[float]) -> None:
        if self._asked is None or len(losses) > len(self._asked):
            raise SearchError(f"got {len(losses)} losses for the {0 if self._asked is None else len(self._asked)} "
                              "asked candidates")
        if len(losses) == len(self._asked):  # a shorter last round (budget reached) is not told
            self._es.tell(list(self._asked), [float(v) for v in losses])
        self._asked = None

    def close(self) -> None:
        self._es = None


class NevergradOptimizer:
    """A nevergrad optimizer on ng.p.Array(init=start, lower=-bound, upper=bound), budget and population from the
    config (population None = 1). NGOpt with population 1 and 20 weights selects COBYLA (as in LoraHub's code)."""

    def __init__(self, config: SearchConfig, dimension: int, start: np.ndarray | None = None):
        import nevergrad as ng  # ~1.5 s to import: only when a search runs

        # nevergrad hands scipy's COBYLA an end radius above its start radius for short budgets, and, restarting
        # it when it converges early, fewer evaluations than its first simplex needs; scipy resets either and warns
        # from the optimizer's own thread (so no local catch_warnings can see it): harmless (the search loop asks
        # no more than the budget), silenced.
        warnings.filterwarnings("ignore", message="COBYLA: Invalid (RHOEND|MAXFUN)")

        registry = ng.optimizers.registry
        if config.optimizer not in registry:
            raise SearchError(_unknown(config.optimizer, registry))
        factory = registry[config.optimizer]
        self.population = config.population or 1
        if self.population > 1 and getattr(factory, "no_parallelization", False):  # checked before building
            raise SearchError(f"optimizer {config.optimizer!r} is sequential: it needs population=1, "
                              f"got {self.population}")
        init = start_point(config, dimension, np.random.default_rng(config.seed)) if start is None else start
        parametrization = ng.p.Array(init=init, lower=-config.bound, upper=config.bound)
        parametrization.random_state = np.random.RandomState(config.seed)
        self._optimizer = factory(parametrization=parametrization, budget=config.budget,
                                  num_workers=self.population)
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
            "use another optimizer, e.g. 'cma' or 'TwoPointsDE'")

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
    close = difflib.get_close_matches(name, ["cma", *registry], n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (f"unknown optimizer {name!r}{hint}. Valid names include {', '.join(COMMON)} "
            f"({len(registry)} in nevergrad.optimizers.registry, and 'cma')")
