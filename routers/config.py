"""MoLEConfig and ArrowConfig: how a router decides. Typed, validated on entry, serialized as JSON."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

from routers.errors import RouterError

GRANULARITIES = ("token", "sequence")


@dataclass(frozen=True)
class MoLEConfig:
    """MoLE (Wu et al. 2024): a learned gate per LoRA layer (per wrapped module) over frozen experts.

    G = softmax(W x / tau) with W [E, in] (zero at start: every expert equal) and a learnable temperature tau.
    """

    top_k: int | None = None  # None: dense, every expert through the op (the paper); k: top k, renormalized
    granularity: str = "token"  # "token": a gate per token; "sequence": per row, from its tokens' mean input
    temperature: float = 1.0  # tau's initial value (it learns)
    balance_weight: float = 0.5  # weight of the balance loss -log prod_i q_i (the paper: 0.5)
    disable: tuple[str, ...] = ()  # experts masked out at inference; the rest renormalized

    def __post_init__(self):
        object.__setattr__(self, "disable", tuple(self.disable))
        _top_k(self.top_k, allow_none=True)
        if self.granularity not in GRANULARITIES:
            raise RouterError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        _positive("temperature", self.temperature)
        if not _real(self.balance_weight) or self.balance_weight < 0:
            raise RouterError(f"balance_weight must be a finite number >= 0, got {self.balance_weight!r}")

    method = "mole"


@dataclass(frozen=True)
class ArrowConfig:
    """Arrow (Ostapenko et al. 2024), training-free: score |<x, p_e>| against each expert's prototype p_e (top right
    singular vector of B_e A_e in that layer), keep the top k, softmax(score / temperature)."""

    top_k: int = 3
    temperature: float = 1.0
    disable: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "disable", tuple(self.disable))
        _top_k(self.top_k, allow_none=False)
        _positive("temperature", self.temperature)

    method = "arrow"


CONFIGS = {"mole": MoLEConfig, "arrow": ArrowConfig}


def config_to_json(config) -> dict:
    return {"method": config.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}}


def config_from_json(data: dict):
    data = dict(data)
    cls = CONFIGS.get(data.pop("method", None))
    if cls is None:
        raise RouterError(f"router config needs a method among {sorted(CONFIGS)}")
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise RouterError(f"unknown {cls.method} config keys: {sorted(unknown)}")
    return cls(**data)


def _top_k(value, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RouterError(f"top_k must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def _positive(name: str, value) -> None:
    if not _real(value) or not value > 0:
        raise RouterError(f"{name} must be a finite number > 0, got {value!r}")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
