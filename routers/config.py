"""Router configs: how a router decides. Typed, validated on entry, serialized as JSON.

MoLEConfig and ArrowConfig route over experts the caller gives (frozen); SiRAConfig and LoRAMoEConfig make their
own new LoRA experts, which train together with the routers (`trains_experts`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
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
    trains_experts = False


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
    trains_experts = False


NumExperts = int | Sequence[int] | Callable[[int], int]


@dataclass(frozen=True)
class SiRAConfig:
    """SiRA (Zhu et al. 2023): new LoRA experts per target module, a linear router, sparse top-k with a capacity.

    Per token: p = softmax(W x); its top_k experts; per expert at most C = ceil(capacity_factor * n * top_k / E)
    pairs of the n real tokens of the batch, the rest dropped (see routers.sira for the priority); gates
    renormalized over the kept experts; gate dropout in training. Aux losses: Switch balance and router z-loss.
    """

    num_experts: NumExperts = 8  # an int, one int per layer, or a function of the layer index (MoLA)
    top_k: int = 2
    rank: int = 8
    capacity_factor: float | None = 1.25  # in training; None: no capacity
    target_modules: tuple[str, ...] | None = None  # None: every linear of the layer stack (attention and MLP)
    gate_dropout: float = 0.1  # on the kept pairs' gates, training only (nn.Dropout's rule: survivors / (1 - p))
    aux_loss_weight: float = 1e-2  # Switch load balance E * sum_i f_i P_i (1.0 when balanced)
    z_loss_weight: float = 1e-3  # mean logsumexp(logits)^2
    alpha: float = 16.0  # expert scale alpha / rank (PEFT's lora_alpha; 16 at rank 8 is the common 2r)
    eval_capacity_factor: float | None = None  # at inference; None: every token keeps its top k (batch-independent)
    renormalize: bool = True  # gates = kept probabilities / their sum; False: the raw probabilities (Switch, k=1)
    seed: int = 0  # experts' and routers' initialization, gate dropout
    disable: tuple[str, ...] = ()

    def __post_init__(self):
        _moe_common(self)
        _top_k(self.top_k, allow_none=False)
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if not _real(self.gate_dropout) or not 0 <= self.gate_dropout < 1:
            raise RouterError(f"gate_dropout must be a number in [0, 1), got {self.gate_dropout!r}")
        for name in ("aux_loss_weight", "z_loss_weight"):
            _non_negative(name, getattr(self, name))
        if not isinstance(self.renormalize, bool):
            raise RouterError(f"renormalize must be true or false, got {self.renormalize!r}")

    method = "sira"
    trains_experts = True


@dataclass(frozen=True)
class LoRAMoEConfig:
    """LoRAMoE (Dou et al. 2024): new LoRA experts per target module, a dense token softmax router over all of them,
    and the localized balancing constraint: experts in `expert_groups` (sizes, in bank order), each example of a
    type (its group), Z = I * Q with I = 1 + delta where an expert's group matches the example's type and 1 - delta
    elsewhere, loss = balance_weight * var(Z) / mean(Z)^2 (see routers.loramoe)."""

    num_experts: NumExperts = 6
    rank: int = 8
    target_modules: tuple[str, ...] | None = None  # None: every linear of the layer stack (attention and MLP)
    balance_weight: float = 0.1  # beta
    balance_delta: float = 0.1  # delta
    expert_groups: tuple[int, ...] | None = None  # group sizes summing to num_experts; None: plain CV^2
    alpha: float = 16.0  # expert scale alpha / rank
    seed: int = 0
    disable: tuple[str, ...] = ()

    def __post_init__(self):
        _moe_common(self)
        _non_negative("balance_weight", self.balance_weight)
        if not _real(self.balance_delta) or not 0 <= self.balance_delta < 1:
            raise RouterError(f"balance_delta must be a number in [0, 1), got {self.balance_delta!r}")
        if self.expert_groups is not None:
            groups = tuple(self.expert_groups)
            if not groups or any(not _count(g) for g in groups):
                raise RouterError(f"expert_groups must be positive group sizes, got {self.expert_groups!r}")
            object.__setattr__(self, "expert_groups", groups)
            sizes = [self.num_experts] if _count(self.num_experts) else (
                self.num_experts if isinstance(self.num_experts, tuple) else [])
            if any(e != sum(groups) for e in sizes):
                raise RouterError(f"expert_groups {groups} must sum to num_experts ({self.num_experts!r} per layer)")

    method = "loramoe"
    trains_experts = True


CONFIGS = {"mole": MoLEConfig, "arrow": ArrowConfig, "sira": SiRAConfig, "loramoe": LoRAMoEConfig}


def config_to_json(config) -> dict:
    if callable(getattr(config, "num_experts", None)):
        raise RouterError("a num_experts function has no JSON form: attach_router resolves it to one int per layer")
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


def _moe_common(config) -> None:
    """Validate and normalize the fields SiRA and LoRAMoE share (lists become tuples)."""
    object.__setattr__(config, "disable", tuple(config.disable))
    n = config.num_experts
    if isinstance(n, Sequence) and not isinstance(n, str):
        n = tuple(n)
        if not n or any(not _count(e) for e in n):
            raise RouterError(f"num_experts per layer must be positive ints, got {config.num_experts!r}")
        object.__setattr__(config, "num_experts", n)
    elif not (_count(n) or callable(n)):
        raise RouterError(f"num_experts must be a positive int, one per layer, or a function of the layer index; "
                          f"got {n!r}")
    if not _count(config.rank):
        raise RouterError(f"rank must be a positive int, got {config.rank!r}")
    _positive("alpha", config.alpha)
    if config.target_modules is not None:
        targets = (config.target_modules,) if isinstance(config.target_modules, str) else tuple(config.target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise RouterError(f"target_modules must be module names or None, got {config.target_modules!r}")
        object.__setattr__(config, "target_modules", targets)
    if isinstance(config.seed, bool) or not isinstance(config.seed, int):
        raise RouterError(f"seed must be an int, got {config.seed!r}")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative(name: str, value) -> None:
    if not _real(value) or value < 0:
        raise RouterError(f"{name} must be a finite number >= 0, got {value!r}")


def _positive(name: str, value) -> None:
    if not _real(value) or not value > 0:
        raise RouterError(f"{name} must be a finite number > 0, got {value!r}")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
