"""SearchConfig: how a LoraHub search runs. Typed, validated on entry, serialized as JSON.

The defaults are written here once; `lorahub_search` and the CLI read them (`DEFAULTS`). They were compared on
planted problems (benchmarks/search_quality.py, RESULTS.md). Among gradient-free settings LoraHub's own, nevergrad's
NGOpt (COBYLA here) from w = 0, one candidate per forward, closed as much of the gap as any CMA-ES setting tried
(random or zero start, steps 0.25-1, populations 4-12, sign symmetry folded or not, the best single adapter first);
`SearchConfig.lorahub()` names it, the reference. The default is optimizer="adam": Adam through the grouped op's
backward (`fit_weights`' descent), each step charged GRADIENT_STEP_COST evaluations of the budget. At N = 20 (LoraHub's
number of modules) it closed more of the gap than NGOpt at budgets 40 and 200, on the seeds it was tuned on and on
held-out ones, in less CPU time; at N = 5 it lost on the first seeds and won on the held-out ones; on the 20 held-out
tasks of the cross-task table, validated, it tied NGOpt in 0.56x the time. optimizer="cma" runs
CMA-ES with a population per batched forward (the cheaper wall clock where a forward of many rows costs about one).
FitConfig is fit_weights' config (fit.py).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import ClassVar, Self

from lorahub_engine.search.errors import SearchError

MODES = ("fusion", "mixture")  # fusion: LoraHub's factor mix; mixture: the exact sum of the weighted deltas
STARTS = ("zero", "random", "single")
VALIDATIONS = ("exact_match", "exact_match_fallback", "cross_entropy")  # how validation ranks (see validate.py)
LOSSES = ("cross_entropy", "entropy")  # fit_weights: the answers' CE, or the first answer token's entropy
GRADIENT = "adam"  # the optimizer name of gradient descent in a search
GRADIENT_STEP_COST = 3  # evaluations of the budget one step costs: a forward and a backward of every example (on
#                         planted problems 66 steps took 0.71-0.78x the CPU time of NGOpt's 200 evaluations: 3 is
#                         conservative, RESULTS.md)


class JsonConfig:
    """replace / to_json / from_json of a frozen dataclass config (SearchConfig, FitConfig); KIND names it in errors."""

    KIND: ClassVar[str] = "config"

    def replace(self, **changes) -> Self:
        return replace(self, **changes)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Self:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise SearchError(f"unknown {cls.KIND} config keys: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class SearchConfig(JsonConfig):
    KIND: ClassVar[str] = "search"

    budget: int = 40  # objective evaluations in all (LoraHub: 40)
    bound: float = 1.5  # every weight stays in [-bound, bound] (LoraHub: 1.5)
    l1: float = 0.05  # objective = mean answer cross-entropy + l1 * mean |w| (LoraHub: 0.05)
    optimizer: str = "adam"  # "adam" (gradient descent: budget // GRADIENT_STEP_COST steps; start "zero" only), a
    #                          nevergrad optimizer name (LoraHub's: NGOpt, COBYLA here) or "cma" (pycma)
    population: int | None = None  # candidates per batched forward; None = the optimizer's own (cma: 4 + 3 ln N,
    #                                nevergrad: 1)
    start: str = "zero"  # "zero" (LoraHub), "random" (w = 0 is a stationary point of the factor merge), or
    #                      "single": the N one-hot weights first (one forward), then from the best of them
    step: float = 0.5  # initial step size of cma (its sigma0); nevergrad optimizers use their own
    fold: bool = True  # cma in mode "fusion": w and -w are one composition, each candidate taken nearer the mean
    seed: int = 0  # seeds the optimizer's random state (and a random start)
    mode: str = "fusion"  # "fusion" (LoraHub's factor mix) or "mixture" (exact sum of w_i dW_i)
    folds: int = 0  # 0: no validation; k >= 2: k-fold over the examples (>= n: leave-one-out) picks l1, the
    #                 number of evaluations, or a fallback (w = 0, the best single adapter); see validate.py
    validate: str = "exact_match_fallback"  # with folds: rank the options by the held-out shots' greedy answers
    #                   (normalized exact match), ties going to the fallbacks (a search must answer more shots right
    #                   than w = 0), then cross-entropy; "exact_match": cross-entropy breaks ties; "cross_entropy"
    #                   alone (the first rule: it never fell back to w = 0 on the tiny base, RESULTS.md)
    batch_size: int | None = None  # rows per forward (population x examples); None = all rows in one forward
    lr: float = 0.3  # optimizer="adam": its learning rate (0.3 beat 0.1 at budget 40, RESULTS.md)

    @classmethod
    def lorahub(cls, **overrides) -> SearchConfig:
        """LoraHub's released setting, the gradient-free reference: NGOpt from w = 0, one candidate per forward."""
        return cls(**{"optimizer": "NGOpt", "start": "zero", "population": 1, **overrides})

    def __post_init__(self):
        check_positive_int("budget", self.budget)
        for name in ("population", "batch_size"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.population is not None and self.population > self.budget:
            raise SearchError(f"population ({self.population}) must not exceed the budget ({self.budget})")
        check_int("seed", self.seed)
        for name in ("bound", "step"):
            check_number(name, getattr(self, name))
        check_number("l1", self.l1, positive=False)
        if not isinstance(self.optimizer, str) or not self.optimizer:
            raise SearchError(f"optimizer must be a non-empty name, got {self.optimizer!r}")
        check_validation(self.folds, self.validate)
        if not isinstance(self.fold, bool):
            raise SearchError(f"fold must be a bool, got {self.fold!r}")
        check_choice("start", self.start, STARTS)
        check_choice("mode", self.mode, MODES)
        check_number("lr", self.lr)
        if self.optimizer == GRADIENT and (self.start != "zero" or self.population is not None):
            raise SearchError(f"optimizer {GRADIENT!r} descends from its own start (w ~ N(0, 0.1^2) in fusion, 0 in "
                              f"mixture) one point at a time: start must be 'zero' and population None, got "
                              f"{self.start!r} and {self.population!r}")

    @property
    def history_length(self) -> int:
        """Evaluations a search of this config records: the budget, or the steps of a gradient descent."""
        return max(1, self.budget // GRADIENT_STEP_COST) if self.optimizer == GRADIENT else self.budget

    def with_history_length(self, length: int) -> SearchConfig:
        """This config with the budget that records `length` evaluations (validation picks a length)."""
        return self.replace(budget=length * GRADIENT_STEP_COST if self.optimizer == GRADIENT else length)

    def descent(self) -> FitConfig:
        """The gradient descent optimizer="adam" runs: fit_weights' Adam on this objective, budget in steps."""
        return FitConfig(steps=self.history_length, lr=self.lr, l1=self.l1, bound=self.bound, mode=self.mode,
                         seed=self.seed)


@dataclass(frozen=True)
class FitConfig(JsonConfig):
    """fit_weights' settings (fit.py); `descend` runs them."""

    KIND: ClassVar[str] = "fit"

    steps: int = 40  # Adam steps (one forward and backward of all examples each)
    lr: float = 0.1  # Adam's learning rate
    l1: float = 0.05  # objective = mean loss + l1 * mean |w| (LoraHub's regularizer)
    bound: float = 1.5  # weights are clamped to [-bound, bound] after every step
    mode: str = "fusion"  # "fusion" (LoraHub's factor mix) or "mixture" (exact sum of w_i dW_i)
    loss: str = "cross_entropy"  # or "entropy" (AdaMerging, on unlabeled inputs)
    init: float = 0.1  # fusion starts at w ~ N(0, init^2): w = 0 has zero gradient there (dW is quadratic in w)
    seed: int = 0  # seeds the start
    folds: int = 0  # 0: no validation; k >= 2: k-fold over the examples (see validate.py)
    validate: str = "exact_match_fallback"  # with folds: a rule of VALIDATIONS (validate.py)

    def __post_init__(self):
        check_positive_int("steps", self.steps)
        for name in ("lr", "bound"):
            check_number(name, getattr(self, name))
        for name in ("l1", "init"):
            check_number(name, getattr(self, name), positive=False)
        check_choice("mode", self.mode, MODES)
        check_choice("loss", self.loss, LOSSES)
        check_int("seed", self.seed)
        check_validation(self.folds, self.validate)
        if self.folds and self.loss == "entropy":
            raise SearchError("validation needs answers: folds must be 0 with loss='entropy'")


# ---- checks shared by SearchConfig and FitConfig ---------------------------------------------------------------
def check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SearchError(f"{name} must be an int, got {value!r}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SearchError(f"{name} must be a positive int, got {value!r}")


def check_number(name: str, value, positive: bool = True) -> None:
    """A finite real number, > 0 (positive) or >= 0."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not real or (value <= 0 if positive else value < 0):
        raise SearchError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SearchError(f"{name} must be one of {choices}, got {value!r}")


def check_validation(folds, validate) -> None:
    """folds: 0 (no validation) or k >= 2; validate: a rule of VALIDATIONS."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 0 or folds == 1:
        raise SearchError(f"folds must be 0 (no validation) or an int >= 2, got {folds!r}")
    if not isinstance(validate, str) or validate not in VALIDATIONS:
        raise SearchError(f"validate must be one of {VALIDATIONS}, got {validate!r}")


DEFAULTS = SearchConfig()  # what lorahub_search and `lorahub-engine search` use when not told otherwise
