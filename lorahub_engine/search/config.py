"""SearchConfig: how a LoraHub search runs. Typed, validated on entry, serialized as JSON."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

from lorahub_engine.search.errors import SearchError


@dataclass(frozen=True)
class SearchConfig:
    budget: int = 40  # objective evaluations in all (LoraHub: 40)
    bound: float = 1.5  # every weight stays in [-bound, bound] (LoraHub: 1.5)
    l1: float = 0.05  # objective = mean answer cross-entropy + l1 * mean |w| (LoraHub: 0.05)
    optimizer: str = "NGOpt"  # a nevergrad optimizer name (LoraHub's code: NGOpt, which picks COBYLA here)
    population: int = 1  # candidates asked, evaluated in one batched forward, then told; 1 = LoraHub's loop
    seed: int = 0  # seeds the optimizer's random state
    batch_size: int | None = None  # rows per forward (population x examples); None = all rows in one forward

    def __post_init__(self):
        for name in ("budget", "population"):
            _positive_int(name, getattr(self, name))
        if self.population > self.budget:
            raise SearchError(f"population ({self.population}) must not exceed the budget ({self.budget})")
        if self.batch_size is not None:
            _positive_int("batch_size", self.batch_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SearchError(f"seed must be an int, got {self.seed!r}")
        if not _real(self.bound) or not self.bound > 0:
            raise SearchError(f"bound must be a finite number > 0, got {self.bound!r}")
        if not _real(self.l1) or self.l1 < 0:
            raise SearchError(f"l1 must be a finite number >= 0, got {self.l1!r}")
        if not isinstance(self.optimizer, str) or not self.optimizer:
            raise SearchError(f"optimizer must be a non-empty name, got {self.optimizer!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SearchConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise SearchError(f"unknown search config keys: {sorted(unknown)}")
        return cls(**data)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SearchError(f"{name} must be a positive int, got {value!r}")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
