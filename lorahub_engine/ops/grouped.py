"""`grouped_lora`: the public op, its backend choice and its autograd Function.

Index legend: t tokens (T), j slots (k), e experts (E), p = t * k + j a (token, slot) pair, r rank.

    delta[t] = sum_j gates[t, j] * scale[e] * B[e] @ A[e] @ x[t],   e = idx[t, j],  idx == -1 contributes nothing

A backend is a module with four functions over one `plan` it builds from `idx`:
    plan(idx[T,k], num_experts)            -> opaque metadata (pairs grouped by expert)
    shrink(x[T,in], A[E,r,in], plan)       -> u[T*k, r] acc,   u[p] = A[e] @ x[t]          (0 where idx < 0)
    expand(u[T*k,r], B[E,out,r], coef[T*k], plan, out[T,out] | None) -> out,  out[t] += sum_j coef[p] * B[e] @ u[p]
                                           (out None: a new [T, out] tensor of u's dtype holding the sums)
    outer(left[T*k,a], right[T,b], plan)   -> g[E,a,b] acc,   g[e] = sum_{p: idx=e} left[p]^T right[t]
"acc" is the accumulation dtype: fp32 for half inputs, the input's own precision above that.
The forward and the backward below are written once in terms of these, so every backend trains the same way.
A plan whose `float_coefficients` is true (every token routed alike, on the CPU) also has `bind(A, B, floats)`:
its shrink and expand on one bank with one Python float per slot, a callable (x, out) -> out kept per layer.
A `TokenRouting` holds idx and gates and caches the plan: build it once per forward and every layer shares it.
With nothing to differentiate (no grad mode, or no input requiring grad) the forward runs outside autograd.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

import torch

from lorahub_engine.ops.torch_backend import same_row_for_every_token

BACKENDS = ("auto", "torch", "triton")
KEPT_PAIRS = 4096  # routings of up to this many pairs keep each scale's coefficients (a few KiB per layer)


class TokenRouting:
    """Which experts each token uses: idx [T, k] integer (-1 = none), gates [T, k] (None = ones).

    Build it once per forward and share it: validated once; the backend, its plan and the pairs' gates are worked out
    on a layer's first call and reused by every later call, and each layer's coefficients (per scale tensor) on its
    first call (a routing kept across forwards, as a generate's decode steps keep theirs, then computes none). An idx
    expanded from one row (`row.expand(T, -1)`, stride 0 over tokens) or of one token is known in O(1) to route every
    token alike: the torch backend then plans no sort. idx must not change in place afterwards; gates may (what
    derives from them follows gates' version counter, and from a scale, its version counter).
    """

    def __init__(self, idx: torch.Tensor, gates: torch.Tensor | None = None):
        if idx.dim() != 2 or idx.dtype.is_floating_point:
            raise ValueError(f"idx must be an integer tensor of shape [T, k], got {idx.dtype} {tuple(idx.shape)}")
        if gates is not None and gates.shape != idx.shape:
            raise ValueError(f"gates must match idx's shape {tuple(idx.shape)}, got {tuple(gates.shape)}")
        self.idx = idx.long()
        self.gates = torch.ones(idx.shape, device=idx.device) if gates is None else gates
        self._plans: dict[tuple[str, int], object] = {}
        self._pairs: tuple | None = None  # (gates' version, masked gates [T*k], clamped idx [T*k])
        self._uniform: tuple | None = None  # (gates' version, ((expert, gate) per slot) when every token shares them)
        self._per_scale: dict[tuple, tuple] = {}  # (kind, ids of the tensors) -> (the tensors, versions, value)

    @property
    def num_tokens(self) -> int:
        return self.idx.shape[0]

    def plan(self, backend: ModuleType, num_experts: int):
        key = (backend.__name__, num_experts)
        plan = self._plans.get(key)
        if plan is None:
            if not self.idx.is_cuda and self.idx.numel():
                low, high = torch.aminmax(self.idx)
                if int(high) >= num_experts or int(low) < -1:
                    raise ValueError(f"idx values must lie in [-1, {num_experts - 1}]")
            plan = self._plans[key] = backend.plan(self.idx, num_experts)
        return plan

    def coefficients(self, scale: torch.Tensor) -> torch.Tensor:
        """coef[p] = gates[t, j] * scale[e] for valid pairs, 0 for idx == -1. Shape [T*k], at least fp32; not to be
        modified in place. The masking of gates is done once per routing, and for up to KEPT_PAIRS pairs each scale's
        product once (both again only if gates or that scale change): in a model, a layer call's two small ops cost
        tens of microseconds, which matter at decoding sizes only."""
        version = version_of(self.gates)
        if self._pairs is None or version is None or self._pairs[0] != version:
            dtype = torch.promote_types(self.gates.dtype, torch.float32)
            valid = self.idx >= 0
            gates = torch.where(valid, self.gates.detach().to(dtype), 0).reshape(-1)
            self._pairs = (version, gates, self.idx.clamp(min=0).reshape(-1))
        _, gates, safe_idx = self._pairs

        def product():
            return gates * (scale if scale.dtype == gates.dtype else scale.to(gates.dtype)).index_select(0, safe_idx)
        return product() if safe_idx.shape[0] > KEPT_PAIRS else self._kept("tensor", (scale,), version, product)

    def uniform_coefficients(self, scale: torch.Tensor) -> tuple[float, ...] | None:
        """Each slot's coefficient gates[t, j] * scale[e_j] (0.0 for e_j = -1) as Python floats when every token uses
        the same experts with the same gates (one token, or one row expanded over the tokens: stride 0), on the CPU
        (reading values back is free there; on CUDA it would wait for the device); None otherwise. Experts and gates
        are read once per routing, each scale once (again only if gates or that scale change)."""
        version = version_of(self.gates)
        if self._uniform is None or version is None or self._uniform[0] != version:
            self._uniform = (version, self._shared_slots())
        slots = self._uniform[1]
        if slots is None:
            return None

        def floats():
            values = scale.tolist()  # one call, no indexing op per slot
            return tuple(0.0 if e < 0 else gate * values[e] for e, gate in slots)
        return self._kept("floats", (scale,), version, floats)

    def bound(self, plan, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor):
        """`plan.bind(A, B, floats)` where the plan takes float coefficients (`float_coefficients`: every token routed
        alike, on the CPU): the layer's shrink and expand with views of its bank and the coefficients as floats, kept
        per bank while the gates and the scales are unchanged (in place changes of the bank need nothing: its views
        see them); None otherwise. A decode step's layer call then costs its two matmuls and a lookup."""
        if not getattr(plan, "float_coefficients", False):
            return None

        def bind():
            floats = self.uniform_coefficients(scale)
            return None if floats is None else plan.bind(A, B, floats)
        return self._kept("bound", (A, B, scale), version_of(self.gates), bind)

    def _kept(self, kind, tensors: tuple[torch.Tensor, ...], version: int | None, compute):
        """compute(), kept per (kind, tensors) while the gates (at `version`) and the last tensor (a scale) are
        unchanged. The tensors are matched by id and held with the value (a layer's bank and scale, which its layer
        holds anyway), so no other tensor can take their ids while the routing lives."""
        key, scale_version = (kind, *map(id, tensors)), version_of(tensors[-1])
        kept = self._per_scale.get(key)
        if kept is not None and kept[1] == (version, scale_version):  # never None: not kept
            return kept[2]
        value = compute()
        if version is not None and scale_version is not None:
            self._per_scale[key] = (tensors, (version, scale_version), value)
        return value

    def _shared_slots(self) -> tuple[tuple[int, float], ...] | None:
        """((expert, gate) per slot) shared by every token, read from the first; None where uniform_coefficients has
        none."""
        idx, gates = self.idx, self.gates
        if idx.is_cuda or gates.requires_grad or not (same_row_for_every_token(idx) and same_row_for_every_token(gates)):
            return None
        return tuple(zip(idx[0].tolist(), gates[0].tolist()))


def version_of(t: torch.Tensor) -> int | None:
    """t's in-place version counter; None for a tensor made under torch.inference_mode (it keeps none: whatever is
    cached from it is recomputed at every call)."""
    return None if t.is_inference() else t._version


def grouped_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    idx: torch.Tensor,
    gates: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """LoRA deltas of many experts for many tokens at once.

    x [T, in], A [E, r, in], B [E, out, r], scale [E], idx [T, k] integer (-1 = none), gates [T, k] (None = ones).
    Returns delta [T, out] in x's dtype. Differentiable in x, A, B and gates (scale and idx are constants).
    Mixed ranks are expressed by zero-padding A's rows and B's columns to a common r.
    """
    return grouped_lora_routed(x, A, B, scale, TokenRouting(idx, gates), backend)


def grouped_lora_routed(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    routing: TokenRouting,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    """`grouped_lora` with a shared TokenRouting; with `out` [T, out] (x's dtype) the delta is added into it in place
    and `out` is returned (a layer passes its base output: one pass over the activations instead of three).
    Without anything to differentiate (no grad mode, or no input that requires grad) the forward runs directly,
    outside autograd. `check=False` skips the shape checks, for callers whose shapes hold by construction (a
    LoraLayer: its bank is built to fit, and routings are built for its tokens)."""
    if check:
        _check_shapes(x, A, B, scale, routing, out)
    impl = resolve_backend(backend, x)
    plan = routing.plan(impl, A.shape[0])
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                    or routing.gates.requires_grad or (out is not None and out.requires_grad)):
        return _GroupedLora.apply(out, x, A, B, scale, routing.gates, routing, impl, plan)
    bound = routing.bound(plan, A, B, scale)  # every token alike: the coefficients as the matmuls' alphas
    if bound is not None:
        return bound(x, out)
    return _forward(impl, plan, routing.coefficients(scale), x, A, B, out)[0]


def resolve_backend(name: str, x: torch.Tensor) -> ModuleType:
    """The backend module for `name`; "auto" picks Triton for CUDA tensors and torch otherwise."""
    return _backend(name, x.is_cuda)


@functools.cache
def _backend(name: str, cuda: bool) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        name = "triton" if cuda and importlib.util.find_spec("triton") is not None else "torch"
    return importlib.import_module(f"lorahub_engine.ops.{name}_backend")


def pair_coefficients(scale: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """coef[p] = gates[t, j] * scale[e] for valid pairs, 0 for idx == -1. Shape [T*k], at least fp32."""
    return TokenRouting(idx, gates).coefficients(scale)


def _forward(backend: ModuleType, plan, coef: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta, or out with the delta added; u [T*k, r]): the forward, with or without autograd around it."""
    u = backend.shrink(x, A, plan)  # (T*k, r) acc
    if out is None:
        return backend.expand(u, B, coef, plan, None).to(x.dtype), u
    return backend.expand(u, B, coef, plan, out), u


class _GroupedLora(torch.autograd.Function):
    # `out` comes first: when it is a view modified in place, autograd maps input 0's gradient onto the view's base.
    @staticmethod
    def forward(ctx, out, x, A, B, scale, gates, routing, backend, plan):
        coef = routing.coefficients(scale)
        y, u = _forward(backend, plan, coef, x, A, B, out)
        if out is not None:
            ctx.mark_dirty(out)
        ctx.save_for_backward(x, A, B, scale, gates, u, coef)
        ctx.plan, ctx.backend, ctx.idx = plan, backend, routing.idx
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, A, B, scale, gates, u, coef = ctx.saved_tensors
        plan, backend, idx = ctx.plan, ctx.backend, ctx.idx
        need_out, need_x, need_A, need_B, _, need_gates, _, _, _ = ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        grad_x = grad_A = grad_B = grad_gates = None
        # v[p] = B[e]^T grad_y[t]: the gradient arriving at the rank-r bottleneck of pair p.
        v = backend.shrink(grad_y, B.transpose(1, 2), plan)  # (T*k, r); a backend copies the view if it must
        if need_x:
            grad_x = backend.expand(v, A.transpose(1, 2), coef, plan, None).to(x.dtype)
        if need_A:
            grad_A = backend.outer(v * coef[:, None], x, plan).to(A.dtype)  # (E, r, in)
        if need_B:
            grad_B = backend.outer(u * coef[:, None], grad_y, plan).transpose(1, 2).to(B.dtype)  # (E, out, r)
        if need_gates:
            per_pair = scale.to(u.dtype)[idx.clamp(min=0)].reshape(-1) * (u * v).sum(-1)
            per_pair = torch.where(idx.reshape(-1) >= 0, per_pair, torch.zeros_like(per_pair))
            grad_gates = per_pair.view(idx.shape).to(gates.dtype)
        return grad_y if need_out else None, grad_x, grad_A, grad_B, None, grad_gates, None, None, None


def _check_shapes(x, A, B, scale, routing: TokenRouting, out) -> None:
    if x.dim() != 2 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"expected x [T,in], A [E,r,in], B [E,out,r]; got {tuple(x.shape)}, {tuple(A.shape)}, {tuple(B.shape)}")
    E, r, d_in = A.shape
    if x.shape[1] != d_in or B.shape[0] != E or B.shape[2] != r:
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    if A.dtype != x.dtype or B.dtype != x.dtype:
        raise ValueError(f"x, A and B must share a dtype, got {x.dtype}, {A.dtype}, {B.dtype}")
    if scale.shape != (E,):
        raise ValueError(f"scale must have shape ({E},), got {tuple(scale.shape)}")
    if routing.num_tokens != x.shape[0]:
        raise ValueError(f"idx must have shape [T={x.shape[0]}, k], got {tuple(routing.idx.shape)}")
    if out is not None and (out.shape != (x.shape[0], B.shape[1]) or out.dtype != x.dtype):
        raise ValueError(f"out must be [{x.shape[0]}, {B.shape[1]}] of {x.dtype}, got {out.dtype} {tuple(out.shape)}")
