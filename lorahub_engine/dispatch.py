"""The one routing interface every LoraLayer asks, its fixed implementations, and the per-forward context.

A layer asks `ctx.routing(layout).route(layer, x, layout, ctx)` for (A, B, scale, TokenRouting) of its tokens x [T, in]:
    RowRouting       per batch row experts idx [N, k] (N = 1 broadcasts); "fusion" mixes each row's experts' factors
    PerTokenRouting  experts per token idx [T, k] (rows-major), mixture only
    LearnedRouting   each layer's own router module (`layer.router`) reads the layer's input: routers/ builds these
A fixed routing builds its TokenRouting once per forward (kept in the context) and every layer shares it.

A `ForwardContext` lives for one forward of the model (opened by attach's forward pre-hook, closed by its forward
hook; encoder and decoder stacks open nested ones): it knows each input's rows and padding mask and collects the
learned routers' outputs of that forward only. Index legend: T tokens, k slots, E experts, N routing rows.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from lorahub_engine.merge.lorahub_factors import lorahub_factors
from lorahub_engine.ops.grouped import TokenRouting, version_of

MODES = ("mixture", "fusion")
KEPT_SHAPES = 4  # batch shapes (rows, length) whose TokenRouting a per-row mixture keeps across forwards


@dataclass(frozen=True)
class TokenLayout:
    """How a layer's T flat tokens (rows-major) sit in the batch: `rows` rows of `length` tokens; `mask` [T] bool
    (True = real token) or None when the forward has no padding."""

    rows: int
    length: int
    mask: torch.Tensor | None = None

    @property
    def row(self) -> torch.Tensor:
        """Batch row of each token [T]."""
        return torch.arange(self.rows, device=self.mask.device if self.mask is not None else None).repeat_interleave(
            self.length)

    def real(self, device=None) -> torch.Tensor:
        """The mask as a [T] bool tensor (all True without padding)."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.rows * self.length, dtype=torch.bool, device=device)


class RouterOutput(NamedTuple):
    """What a learned router returns for the T tokens of one layer call."""

    indices: torch.Tensor  # [T, k] long, -1 = none
    gates: torch.Tensor  # [T, k], the weights the grouped op applies
    probs: torch.Tensor  # [T, E], the router's distribution over all experts (before top-k)
    aux: dict[str, torch.Tensor]  # named auxiliary losses, weighted, scalars (empty at inference)


class RouterRecord(NamedTuple):
    """One layer call's router output and the layout of its tokens (which of them are padding)."""

    output: RouterOutput
    layout: TokenLayout


class ForwardContext:
    """One forward's routing, token layouts and router outputs. `sources` are (tensor, mask [rows, L] | None) pairs:
    a layer whose input IS one of these tensors (a decoder's cross-attention over encoder states) takes its mask;
    any other input [rows, L, d] takes the last L columns of `mask` (decode steps with a KV cache: past + current)."""

    def __init__(self, spec, rows: int | None, length: int | None, mask: torch.Tensor | None = None, sources=(),
                 parent: ForwardContext | None = None):
        self.spec = spec  # the routing in force (None = base only), resolved on first use
        self.rows, self.length = rows, length  # of the forward's own input; None = taken from the first layer
        self.mask = mask  # [rows, L >= every layer's length] attention mask of the forward, 0 = padding
        self.sources = list(sources)
        self.records: dict[str, RouterRecord] = {} if parent is None else parent.records
        self.shared: dict = {}  # fixed routings' TokenRouting per layout, built once per forward
        self._layouts: dict = {}
        self._by_shape: dict = {}  # input shape -> layout, when no source tensor carries its own mask
        self._routing = None

    def routing(self, layout: TokenLayout):
        """The routing of this forward (per row or per token decided once, from the forward's input shape)."""
        if self._routing is None:
            self._routing = self.spec.resolve(self.rows or layout.rows, self.length or layout.length)
        return self._routing

    def layout(self, x: torch.Tensor) -> TokenLayout:
        """The layout of a layer input x [rows, ..., d] (rows x the product of the middle dims; [d]: one token)."""
        if not self.sources:  # the common case: one lookup by shape per layer call
            layout = self._by_shape.get(x.shape)
            if layout is None:
                layout = self._by_shape[x.shape] = self._layout(x)
            return layout
        return self._layout(x)

    def _layout(self, x: torch.Tensor) -> TokenLayout:
        rows = x.shape[0] if x.dim() > 1 else 1
        length = x.numel() // (x.shape[-1] * rows) if x.numel() else 0
        for i, (source, mask) in enumerate(self.sources):
            if x is source:
                return self._cached((i, rows, length), mask, rows, length)
        return self._cached((None, rows, length), self.mask, rows, length)

    def _cached(self, key, mask, rows, length) -> TokenLayout:
        layout = self._layouts.get(key)
        if layout is None:
            if mask is not None and (mask.dim() != 2 or mask.shape[0] != rows or mask.shape[1] < length):
                mask = None  # a mask of another shape (4D, other rows) does not describe these tokens
            flat = None if mask is None or bool(mask[:, -length:].all()) else mask[:, -length:].reshape(-1).bool()
            layout = self._layouts[key] = TokenLayout(rows, length, flat)
        return layout

    def record(self, name: str, output: RouterOutput, layout: TokenLayout) -> None:
        self.records[name] = RouterRecord(output, layout)


class RowRouting:
    """Experts idx [N, k] (-1 = none) with gates [N, k] per batch row (N = 1 broadcasts to every row).

    mode "mixture" sums the k experts' outputs; "fusion" first merges each row's k experts into one by the LoraHub
    factor rule (gates as weights), then applies that single expert. Equal rows share one merged expert (a LoraHub
    population repeats each candidate over its examples: merged once per candidate and layer, not per row).
    A mixture keeps the TokenRouting of its last KEPT_SHAPES batch shapes across forwards (a generate's prefill and
    decode steps), so each decode step reuses the plan and every layer's coefficients of the step before; an in-place
    change of idx or gates rebuilds it; trainable gates and fusion (new merged experts at every call) build one per
    forward.
    """

    def __init__(self, idx: torch.Tensor, gates: torch.Tensor, mode: str = "mixture"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if idx.dim() != 2 or gates.shape != idx.shape:
            raise ValueError(f"idx and gates must both be [rows, k]; got {tuple(idx.shape)}, {tuple(gates.shape)}")
        self.idx, self.gates, self.mode = idx, gates, mode
        self._fused = None
        self._kept: OrderedDict[tuple[int, int], tuple[tuple[int, int], TokenRouting]] = OrderedDict()

    def resolve(self, rows: int, length: int):
        return self

    def fused(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fusion's distinct rows: (idx [U, k], gates [U, k]) and, for each of the N rows, which one it is [N].
        Learnable gates keep every row (each row's gates get their own gradient)."""
        if self.gates.requires_grad:
            return self.idx, self.gates, torch.arange(len(self.idx), device=self.idx.device)
        if self._fused is None:
            key = torch.cat([self.idx.double(), self.gates.double()], dim=1)  # (N, 2k)
            _, inverse = torch.unique(key, dim=0, return_inverse=True)  # (N,) in [0, U)
            N, U = len(inverse), int(inverse.max()) + 1
            first = torch.full((U,), N, device=inverse.device).scatter_reduce_(
                0, inverse, torch.arange(N, device=inverse.device), "amin")  # a representative row of each
            self._fused = self.idx[first], self.gates[first], inverse
        return self._fused

    def route(self, layer, x: torch.Tensor, layout: TokenLayout, ctx: ForwardContext):
        A, B, scale = layer.bank()
        if self.mode == "fusion":  # one merged expert per distinct row: its k experts' factors mixed
            idx, gates, _ = self.fused()  # (U, k)
            e, w = idx.clamp(min=0), torch.where(idx >= 0, gates, torch.zeros_like(gates))
            A, B = lorahub_factors(A[e], B[e], scale[e], w)  # (U, r, in), (U, out, r)
            scale = torch.ones(A.shape[0], dtype=scale.dtype, device=scale.device)
        return A, B, scale, self._tokens(layout, ctx)

    def _tokens(self, layout: TokenLayout, ctx: ForwardContext) -> TokenRouting:
        """This forward's TokenRouting for the layout: the first layer call finds or builds it, the others read it
        from the forward's context."""
        key = (id(self), layout.rows, layout.length)
        routing = ctx.shared.get(key)
        if routing is None:
            routing = ctx.shared[key] = self._routing_for(layout)
        return routing

    def _routing_for(self, layout: TokenLayout) -> TokenRouting:
        shape = (layout.rows, layout.length)
        versions = (version_of(self.idx), version_of(self.gates))
        if self.mode == "fusion" or self.gates.requires_grad or None in versions:
            return TokenRouting(*self._per_token(layout))  # one per forward
        kept = self._kept.get(shape)
        if kept is None or kept[0] != versions:
            kept = self._kept[shape] = (versions, TokenRouting(*self._per_token(layout)))
            while len(self._kept) > KEPT_SHAPES:
                self._kept.popitem(last=False)
        self._kept.move_to_end(shape)
        return kept[1]

    def _per_token(self, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "fusion":  # token t uses its row's merged expert
            idx = self.fused()[2][:, None]  # (N, 1)
            gates = torch.ones(idx.shape, device=idx.device)
        else:
            idx, gates = self.idx, self.gates
        T = layout.rows * layout.length
        if idx.shape[0] == 1:
            return idx.expand(T, -1), gates.expand(T, -1)
        if idx.shape[0] != layout.rows:
            raise ValueError(f"a per-row routing of {idx.shape[0]} rows met a batch of {layout.rows} rows")
        return idx.repeat_interleave(layout.length, dim=0), gates.repeat_interleave(layout.length, dim=0)


class PerTokenRouting:
    """Experts idx [T, k] with gates [T, k] for each token of the batch (rows-major), mixture only."""

    mode = "mixture"

    def __init__(self, idx: torch.Tensor, gates: torch.Tensor):
        self.routing = TokenRouting(idx, gates)

    def resolve(self, rows: int, length: int):
        return self

    def route(self, layer, x: torch.Tensor, layout: TokenLayout, ctx: ForwardContext):
        if x.shape[0] != self.routing.num_tokens:
            raise ValueError(f"a per-token routing of {self.routing.num_tokens} tokens met {x.shape[0]} tokens "
                             f"({layout.rows} rows x {layout.length})")
        return *layer.bank(), self.routing


@dataclass
class AutoRouting:
    """`routing(model, idx, gates)` without `per=`: per row or per token, decided once per forward from the batch's
    rows and length (N in (1, rows) -> per row; N = rows * length -> per token)."""

    idx: torch.Tensor
    gates: torch.Tensor
    mode: str = "mixture"
    _resolved: dict = field(default_factory=dict, repr=False)

    def resolve(self, rows: int, length: int):
        N = self.idx.shape[0]
        per = "row" if N in (1, rows) else "token" if N == rows * length else None
        if per is None:
            raise ValueError(f"routing has {N} rows; the batch has {rows} rows and {rows * length} tokens")
        if per == "token" and self.mode == "fusion":
            raise ValueError(f"fusion merges factors per batch row: routing needs 1 or {rows} rows, got {N}")
        if per not in self._resolved:  # kept across forwards: fusion's distinct rows are found once
            self._resolved[per] = (RowRouting(self.idx, self.gates, self.mode) if per == "row"
                                   else PerTokenRouting(self.idx, self.gates))
        return self._resolved[per]


class LearnedRouting:
    """Each LoRA layer's own router (`layer.router`, an nn.Module: (x [T, in], TokenLayout) -> RouterOutput) decides
    per token from the layer's input; its output is recorded in the forward's context under the layer's path."""

    mode = "mixture"

    def resolve(self, rows: int, length: int):
        return self

    def route(self, layer, x: torch.Tensor, layout: TokenLayout, ctx: ForwardContext):
        out = layer.router(x, layout)
        ctx.record(layer.path, out, layout)
        return *layer.bank(), TokenRouting(out.indices, out.gates)


class Dispatch:
    """What every LoRA layer of one model reads: the routing in force and the forwards in progress.

    The routing in force is the innermost `routing(...)` block, else the default (set_weights or a learned router).
    A forward (`open` .. `close`) may override it (adapter_ids=); nested forwards (encoder, decoder) inherit their
    parent's. When the outermost forward closes, its router records go to every open collector, then are dropped.
    """

    def __init__(self):
        self.stack: list = []  # routing(...) blocks, innermost last
        self.default = None  # set_weights' RowRouting or a LearnedRouting
        self.contexts: list[ForwardContext] = []  # open forwards, innermost last
        self.collectors: list[list] = []  # each receives {layer path: RouterRecord} per outermost forward

    @property
    def current(self):
        return self.stack[-1] if self.stack else self.default

    def open(self, owner, rows: int | None, length: int | None, mask=None, sources=(), override=None) -> None:
        parent = self.contexts[-1] if self.contexts else None
        spec = override if override is not None else parent.spec if parent is not None else self.current
        ctx = ForwardContext(spec, rows, length, mask, sources, parent)
        ctx.owner = owner
        self.contexts.append(ctx)

    def close(self, owner) -> None:
        if not self.contexts or self.contexts[-1].owner is not owner:
            return  # this forward's pre-hook failed before opening
        ctx = self.contexts.pop()
        if not self.contexts and ctx.records:
            for collector in self.collectors:
                collector.append(ctx.records)

    def context_for(self, x: torch.Tensor) -> ForwardContext | None:
        """The open forward's context; a one-call context for a layer run outside any hooked forward; None when
        no routing is in force there."""
        if self.contexts:
            return self.contexts[-1]
        spec = self.current
        return None if spec is None else ForwardContext(spec, None, None)
