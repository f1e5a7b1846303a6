"""Merge methods by name. A method is a pure function of one module's inputs; `register` records it with its paper."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Union

import torch

from lorahub_engine.adapter import LoraModule
from lorahub_engine.merge.functional import SignMethod

Space = Literal["delta", "factors"]
SPACES: tuple[Space, ...] = ("delta", "factors")


class LowRank(NamedTuple):
    """A merged module known in factored form: dW = B @ A, scale 1."""

    B: torch.Tensor  # (out, R)
    A: torch.Tensor  # (R, in)


# A dense merged dW (out, in) is factored afterwards by truncated SVD.
MethodResult = Union[LowRank, torch.Tensor]


@dataclass(frozen=True)
class MergeOptions:
    """Validated options of one merge call (see `merge` for their meaning)."""

    space: Space = "delta"
    rank: int | None = None
    seed: int = 0
    density: float = 0.2
    majority_sign_method: SignMethod = "total"
    knots_method: str = "ties"


@dataclass
class ModuleTasks:
    """One module across the adapters being merged, all in fp32, nn.Linear orientation."""

    name: str
    loras: list[LoraModule]  # the adapters that have this module (an adapter without it contributes zero)
    weights: list[float]  # the merge weight of each of those adapters

    def generator(self, seed: int) -> torch.Generator:
        """A generator for this module only: seeded from seed and a stable hash of the module path, so random
        methods give the same result whatever the order or subset of modules merged."""
        digest = hashlib.blake2b(f"{seed}:{self.name}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


MethodFn = Callable[[ModuleTasks, MergeOptions], MethodResult]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    paper: str
    spaces: tuple[Space, ...]  # spaces where it is defined; exact methods are the same in both
    options: frozenset[str]  # optional arguments of `merge` it reads, beyond weights / rank / space / seed


METHODS: dict[str, Method] = {}


def register(name: str, *, paper: str, spaces: tuple[Space, ...] = SPACES, options: tuple[str, ...] = ()):
    """Decorator: register a method function (or callable object) under `name`."""

    def decorator(fn: MethodFn) -> MethodFn:
        METHODS[name] = Method(name, fn, paper, spaces, frozenset(options))
        return fn

    return decorator
