"""`merge`: validate at the boundary, then merge module by module over the union of the adapters' modules."""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Sequence
from pathlib import PurePath

import torch

from lorahub_engine.adapter import LoraAdapter, LoraModule
from lorahub_engine.errors import IncompatibleModelError, MergeError
from lorahub_engine.merge.linalg import dense_factors, lowrank_svd
from lorahub_engine.merge.methods import KNOTS_INNER
from lorahub_engine.merge.registry import METHODS, SPACES, LowRank, Method, MergeOptions, MethodResult, ModuleTasks
from lorahub_engine.progress import progress_bar

AdapterLike = LoraAdapter | str | os.PathLike


def merge(
    adapters: Sequence[AdapterLike],
    weights: Sequence[float] | None = None,
    method: str = "task_arithmetic",
    *,
    density: float | None = None,
    space: str = "delta",
    rank: int | None = None,
    seed: int = 0,
    name: str | None = None,
    majority_sign_method: str | None = None,
    knots_method: str | None = None,
    progress: bool = False,
) -> LoraAdapter:
    """Merge LoRA adapters into one adapter (scale 1 on every module).

    adapters: LoraAdapter objects or PEFT folders (read lazily: only the module being merged is in memory).
    weights: one finite number per adapter (default all 1).
    method: a name in `METHODS` (task_arithmetic / cat, svd, negate, lorahub, linear, ties, dare_linear,
        dare_ties, magnitude_prune, knots); each method's docstring states its exact semantics.
    density: fraction of entries kept by ties / dare_* / magnitude_prune / knots (default 0.2).
    space: "delta" works on dW_i = s_i B_i A_i (the correct semantics); "factors" reproduces PEFT's factor-space
        linear / ties / dare_* / magnitude_prune. Exact methods (task_arithmetic / cat, svd, negate, lorahub) are
        the same in both; knots is delta only.
    rank: None keeps the result exact (the concatenated rank for cat, the numerical rank of a dense result);
        k truncates every module to its best rank-k approximation by SVD.
    seed: DARE's random drops come from a generator per module, seeded from `seed` and the module path.
    majority_sign_method: "total" (default) or "frequency", for ties / dare_ties / knots.
    knots_method: the task-arithmetic-family method KnOTS applies in its shared basis (default "ties").
    An adapter that lacks a module contributes zero there; the same module with different shapes is an error.
    """
    spec = _method(method)
    options = _options(spec, space, rank, seed, density=density, majority_sign_method=majority_sign_method,
                       knots_method=knots_method)
    if isinstance(adapters, (str, os.PathLike, LoraAdapter)):
        raise MergeError("merge takes a list of adapters, got a single one")
    loaded = [_load(adapter) for adapter in adapters]
    if not loaded:
        raise MergeError("merge needs at least one adapter, got an empty list")
    w = _weights(weights, len(loaded))
    base_model, task_type, fan_in_fan_out = _common_model(loaded)
    paths = list(dict.fromkeys(path for adapter in loaded for path in adapter.modules))
    modules = {path: _merge_module(path, loaded, w, spec, options)
               for path in progress_bar(paths, desc=f"merge ({method})", unit="module", progress=progress)}
    given = {"density": density, "majority_sign_method": majority_sign_method, "knots_method": knots_method}
    record = {"method": method, "sources": [a.name for a in loaded], "weights": w, "space": space, "rank": rank,
              "seed": seed, **{k: v for k, v in given.items() if v is not None}}
    return LoraAdapter(name=name or "merged", modules=modules, base_model=base_model, task_type=task_type,
                       fan_in_fan_out=fan_in_fan_out, metadata={"merge": record})


def _method(method: str) -> Method:
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[method]


def _options(spec: Method, space: str, rank, seed, **given) -> MergeOptions:
    if space not in SPACES:
        raise MergeError(f"space must be one of {SPACES}, got {space!r}")
    if space not in spec.spaces:
        raise MergeError(f"method {spec.name!r} is defined in space {spec.spaces[0]!r} only, not {space!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergeError(f"rank must be None or a positive int, got {rank!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeError(f"seed must be an int, got {seed!r}")
    given = {k: v for k, v in given.items() if v is not None}
    for option in given:
        if option not in spec.options:
            raise MergeError(f"method {spec.name!r} does not take {option}")
    density = given.get("density", MergeOptions.density)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], got {density!r}")
    if given.get("majority_sign_method", "total") not in ("total", "frequency"):
        raise MergeError(f"majority_sign_method must be 'total' or 'frequency', got {given['majority_sign_method']!r}")
    if given.get("knots_method", "ties") not in KNOTS_INNER:
        raise MergeError(f"knots_method must be one of {KNOTS_INNER}, got {given['knots_method']!r}")
    return MergeOptions(space=space, rank=rank, seed=seed, **given)


def _load(adapter: AdapterLike) -> LoraAdapter:
    if isinstance(adapter, LoraAdapter):
        return adapter
    if isinstance(adapter, (str, os.PathLike)):
        return LoraAdapter.load(adapter, lazy=True)
    raise MergeError(f"expected a LoraAdapter or a folder path, got {type(adapter).__name__}")


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if len(weights) != n:
        raise MergeError(f"got {len(weights)} weights for {n} adapters")
    out = []
    for i, x in enumerate(weights):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise MergeError(f"weights[{i}] must be a number, got {x!r}")
        if not math.isfinite(x):
            raise MergeError(f"weights[{i}] is {x}; weights must be finite")
        out.append(float(x))
    return out


def _common_model(adapters: list[LoraAdapter]) -> tuple[str | None, str | None, bool]:
    """The base model, task type and fan_in_fan_out the adapters share; disagreement is an error. Base models are
    compared by the last path component, case-folded ("org/Llama-2-7b" and "/models/llama-2-7b" agree), as attach
    does."""
    result = []
    for field, key in (("base_model", _model_key), ("task_type", str), ("fan_in_fan_out", bool)):
        values = {a.name: getattr(a, field) for a in adapters if getattr(a, field) is not None}
        if len({key(v) for v in values.values()}) > 1:
            listing = ", ".join(f"{n!r}: {v!r}" for n, v in values.items())
            raise IncompatibleModelError(f"adapters disagree on {field} ({listing}); they cannot be merged")
        result.append(next(iter(values.values()), None))
    return result[0], result[1], bool(result[2])


def _model_key(base_model: str) -> str:
    return PurePath(base_model).name.lower()


def _merge_module(path: str, adapters: list[LoraAdapter], weights: list[float], spec: Method,
                  options: MergeOptions) -> LoraModule:
    present = [(a, w, lora) for a, w in zip(adapters, weights) if (lora := a.modules.get(path)) is not None]
    shapes = {a.name: (lora.B.shape[0], lora.A.shape[1]) for a, _, lora in present}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{n!r}: [{o}, {i}]" for n, (o, i) in shapes.items())
        raise IncompatibleModelError(f"module {path!r} has different [out, in] shapes across adapters ({listing})")
    dtype = functools.reduce(torch.promote_types, (lora.A.dtype for _, _, lora in present))
    work = torch.promote_types(dtype, torch.float32)
    tasks = ModuleTasks(path, [LoraModule(lora.A.to(work), lora.B.to(work), lora.scale) for _, _, lora in present],
                        [w for _, w, _ in present])
    B, A = _factor(spec.fn(tasks, options), options.rank)
    return LoraModule(A.to(dtype).contiguous(), B.to(dtype).contiguous(), 1.0)


def _factor(result: MethodResult, rank: int | None) -> LowRank:
    """Factors of a method's result; rank=k truncates a low-rank one above k and any dense one by SVD."""
    if isinstance(result, LowRank):
        return result if rank is None or result.B.shape[1] <= rank else LowRank(*lowrank_svd(*result, rank))
    return LowRank(*dense_factors(result, rank))
