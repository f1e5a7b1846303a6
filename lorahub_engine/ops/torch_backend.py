"""The CPU path of `grouped_lora`, and the reference the Triton kernels are held to.

`plan` looks at how idx was built before it reads it. A routing known to be the same for every token (one token, or
one row expanded over the tokens: stride 0) gets a `UniformPlan`: one matmul each way over all tokens, the bank's
factors taken as views, nothing sorted, nothing read back per call; what a layer call costs there is a few torch
calls. Any other routing gets a `SegmentPlan`, whose primitives each pick a walk and work out its metadata on first
use (once per routing, shared by every layer that gets it); none loops in Python over more than a few dozen experts.
The first that applies (`SegmentPlan.walk`; speeds from `benchmarks/bench_walks.py`):
- runs (`RunPlan`; torch ops), for routings constant over runs of at least MIN_RUN consecutive tokens (a batch
  routed per row: an adapter per request, a retrieval mixture, a LoraHub population). The tokens are cut into C
  chunks of L rows (L = the gcd of the run lengths); shrink and expand are one bmm each over the chunks, with each
  chunk's k experts' weights gathered (k*r x in per chunk, small next to L x in activations): up to 1.4x faster than the
  compiled walk on rows of 64 tokens at one thread, 1.5-1.8x at two, and far ahead of the dense walk on wide banks.
- dense (`DensePlan`), for a narrow bank (E * r <= DENSE_COLUMNS_PER_SLOT * k: 4 experts of rank 8 for one slot, 8
  for two) and at least DENSE_MIN_PAIRS pairs: one matmul each way over all tokens against the whole bank side by
  side, the pairs' experts picked by a gather (shrink) or a scatter (expand, outer) of rank-r rows. E / k times the
  multiply-adds the pairs need, at a matmul's speed: as fast as the compiled walk there or faster. Any routing.
- compiled (fp32 / fp64, with a C++ compiler: `native`): the pairs in tiles of NATIVE_TILE consecutive tokens and by
  expert within a tile (one stable sort on the device; pairs without an expert stay in the walk and the kernels skip
  them); the kernels read and update the tile's activation rows where they lie, in cache, while each expert's weights
  stay in registers, on torch's threads. Any routing: per token over a wide bank, and decoding (one token per row).
Without the compiled kernels, the torch walks:
- segments (torch ops), for per-token routings whose experts get many tokens each: one mm per expert segment
  between a gather and a scatter, no padding.
- blocks (`BlockPlan`; torch ops), for per-token routings over many experts with few tokens each (large E, decoding):
  the sorted pairs in blocks of `block` rows that each belong to one expert (an expert's last block is padded),
  walked as batched matmuls in chunks whose rows fit in cache (~512 KiB).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lorahub_engine.ops import native

CHUNK_BYTES = 1 << 19
MIN_RUN = 16  # shorter runs gather more weight rows than the activation rows they save
MIN_SEGMENT = 64  # mean tokens per expert from which one mm per expert beats padded blocks
GATHER_BYTES = 1 << 25  # run layout: gathered expert weights (or per-chunk products) per bmm, at most
NATIVE_TILE = 128  # segment layout, compiled walk: tokens whose activation rows stay in cache (L2) together
DENSE_COLUMNS_PER_SLOT = 32  # a bank of at most this many columns (experts x rank) per slot is walked densely, as
DENSE_MIN_PAIRS = 64  # one matmul, by a routing of at least this many pairs (fewer, as in decoding: the pairs' walk
# is as fast); wider banks cost more in the dense walk's extra multiply-adds than the pairs' walk loses. Both walks
# use torch's threads, so the bound holds at 1 and 2 threads alike (benchmarks/bench_walks.py).
FLOAT_SLOTS = 4  # one token with up to this many experts: one expand matmul per slot on views of B (no gather)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the input's own precision otherwise (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def same_row_for_every_token(t: torch.Tensor) -> bool:
    """t [T, ...] is known, without reading it, to hold one row for every token: one token, or one row expanded over
    the tokens (stride 0)."""
    T = t.shape[0]
    return T == 1 or (T > 1 and t.stride(0) == 0)


def plan(idx: torch.Tensor, num_experts: int) -> Plan:
    """UniformPlan when every token routes alike (`same_row_for_every_token`); else a SegmentPlan, whose walks sort
    what they need on first use."""
    if same_row_for_every_token(idx):
        row = idx[0]
        return UniformPlan(tuple(row.tolist()), row.clamp(min=0), idx.shape[0], num_experts)
    return SegmentPlan(idx, num_experts)


def shrink(x: torch.Tensor, A: torch.Tensor, plan: Plan) -> torch.Tensor:
    return plan.shrink(x, A)


def expand(u: torch.Tensor, B: torch.Tensor, coef: torch.Tensor, plan: Plan,
           out: torch.Tensor | None) -> torch.Tensor:
    return plan.expand(u, B, coef, out)


def outer(left: torch.Tensor, right: torch.Tensor, plan: Plan) -> torch.Tensor:
    return plan.outer(left, right)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; no call into torch when it already is (calls cost microseconds at one token)."""
    return t if t.dtype == dtype else t.to(dtype)


def _common_run_length(idx: torch.Tensor) -> int:
    """The largest L such that idx is constant over every aligned chunk of L tokens (0 if that L < MIN_RUN)."""
    T = idx.shape[0]
    if T < MIN_RUN:
        return 0
    starts = torch.nonzero((idx[1:] != idx[:-1]).any(1)).flatten() + 1  # first token of each run but the first
    if starts.numel() >= T // MIN_RUN:
        return 0
    return math.gcd(T, *starts.tolist())  # gcd of all run boundaries and T = gcd of the run lengths


@dataclass(frozen=True)
class RunPlan:
    """Tokens cut into C = T / L chunks of L consecutive rows; chunk c routes all its tokens to chunk_idx[c].

    A chunk's k experts are gathered side by side ([k*r, n] per chunk), so the k slots are one matmul of inner or
    outer size k*r: wider, hence faster, than k matmuls of size r, and the k-sum happens inside the expand's bmm.
    """

    chunk_idx: torch.Tensor  # (C, k), -1 = none
    run: int  # L
    num_experts: int

    def _groups(self, bytes_per_chunk: int) -> Iterator[slice]:
        """Slices of consecutive chunks whose gathered weights (or per-chunk products) stay within GATHER_BYTES."""
        C = self.chunk_idx.shape[0]
        size = max(1, GATHER_BYTES // bytes_per_chunk)
        return (slice(first, min(first + size, C)) for first in range(0, C, size))

    def _gather(self, W: torch.Tensor, chunks: slice) -> torch.Tensor:
        """W [E, r, n] -> these chunks' k experts stacked, [c, k*r, n] (an empty slot reads expert 0: callers mask)."""
        return W[self.chunk_idx[chunks].clamp(min=0)].flatten(1, 2)

    def _mask_empty(self, t: torch.Tensor) -> torch.Tensor:
        """Zero, in place, the pairs of t [C, L, k, r] that have no expert."""
        if self.has_empty:
            t.permute(0, 2, 1, 3)[self.chunk_idx < 0] = 0
        return t

    @functools.cached_property
    def has_empty(self) -> bool:
        return bool((self.chunk_idx < 0).any())

    def shrink(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        (C, k), L, (_, r, d_in) = self.chunk_idx.shape, self.run, A.shape
        xs = x.reshape(C, L, d_in)
        u = torch.empty(C, L, k * r, dtype=accum_dtype(x.dtype), device=x.device)
        for chunks in self._groups(k * r * d_in * A.element_size()):
            u[chunks] = torch.bmm(xs[chunks], self._gather(A, chunks).transpose(1, 2))  # (c, L, k*r)
        return self._mask_empty(u.view(C, L, k, r)).view(C * L * k, r)

    def expand(self, u: torch.Tensor, B: torch.Tensor, coef: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        (C, k), L, (_, d_out, r) = self.chunk_idx.shape, self.run, B.shape
        dtype = u.dtype if out is None else out.dtype
        scaled = self._mask_empty((u * coef[:, None]).to(dtype).view(C, L, k, r)).view(C, L, k * r)
        Bt = B.transpose(1, 2)  # (E, r, out)
        if out is None:  # written by the bmm itself, no zero fill
            ys = torch.empty(C, L, d_out, dtype=dtype, device=u.device)
            for chunks in self._groups(k * r * d_out * ys.element_size()):
                torch.bmm(scaled[chunks], self._gather(Bt, chunks).to(dtype), out=ys[chunks])
            return ys.view(C * L, d_out)
        target = out if out.is_contiguous() else out.contiguous()
        ys = target.view(C, L, d_out)
        for chunks in self._groups(k * r * d_out * out.element_size()):
            ys[chunks].baddbmm_(scaled[chunks], self._gather(Bt, chunks).to(dtype))  # k-sum inside the bmm
        return target if target is out else out.copy_(target)

    def outer(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        (C, k), L, a, b = self.chunk_idx.shape, self.run, left.shape[1], right.shape[1]
        ls, rs = left.view(C, L, k * a).transpose(1, 2), right.reshape(C, L, b).to(left.dtype)
        g = torch.zeros(self.num_experts, a, b, dtype=left.dtype, device=left.device)
        for chunks in self._groups(k * a * b * left.element_size()):
            per_chunk = torch.bmm(ls[chunks], rs[chunks]).view(-1, a, b)  # (c*k, a, b)
            experts = self.chunk_idx[chunks].flatten()
            g.index_add_(0, experts[experts >= 0], per_chunk[experts >= 0])
        return g


@dataclass(frozen=True)
class Segments:
    """Valid pairs sorted by expert: sorted row i is pair `pair[i]` of token `token[i]` for expert `expert[i]`;
    expert e owns rows start:stop of one segment (only experts with pairs have one)."""

    pair: torch.Tensor  # (P,)
    token: torch.Tensor  # (P,)
    expert: torch.Tensor  # (P,)
    counts: torch.Tensor  # (E,) rows per expert
    segments: tuple[tuple[int, int, int], ...]  # (expert, start, stop)

    @classmethod
    def build(cls, idx: torch.Tensor, num_experts: int) -> Segments:
        experts, order = torch.sort(idx.reshape(-1), stable=True)
        first_valid = int((experts < 0).sum())
        order, experts = order[first_valid:], experts[first_valid:]  # (P,) valid pairs, sorted by expert
        counts = torch.bincount(experts, minlength=num_experts)
        stops = torch.cumsum(counts, 0).tolist()
        segments = tuple((e, stop - c, stop) for e, (c, stop) in enumerate(zip(counts.tolist(), stops)) if c)
        return cls(order, torch.div(order, idx.shape[1], rounding_mode="floor"), experts, counts, segments)


@dataclass(frozen=True)
class SegmentPlan:
    """A routing that varies over tokens. Each primitive walks its pairs the way `walk` names, and what a walk needs
    is worked out on its first use: `tiled` (the compiled walk: one sort on the device, no host sync), `sorted`
    (segments read on the host; the torch walks), `runs` (chunks of constant routing, where it has them)."""

    idx: torch.Tensor  # (T, k)
    num_experts: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.idx.shape)

    @property
    def num_pairs(self) -> int:
        return self.idx.numel()

    def walk(self, rank: int, *tensors: torch.Tensor) -> str:
        """"runs" where the routing has them; else "dense" for a bank of at most DENSE_COLUMNS_PER_SLOT columns
        (num_experts x rank) per slot and at least DENSE_MIN_PAIRS pairs; else "compiled" where the kernels take
        these tensors, else `torch_walk` (benchmarks/bench_walks.py measures each choice)."""
        if self.runs is not None:
            return "runs"
        T, k = self.shape
        if self.num_experts * rank <= DENSE_COLUMNS_PER_SLOT * k and T * k >= DENSE_MIN_PAIRS:
            return "dense"
        return "compiled" if native.supports(*tensors) else self.torch_walk

    @property
    def torch_walk(self) -> str:
        """The walk in torch ops: "runs" where the routing has them, "blocks" for short segments, else "segments"."""
        return "runs" if self.runs is not None else "blocks" if self.blocks is not None else "segments"

    @functools.cached_property
    def tiled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pair, token, expert) of all T*k pairs by tile of NATIVE_TILE tokens, then by expert, pairs without one
        (-1, which the kernels skip) first in their tile: the compiled kernels' walk, in which a tile's activation rows
        stay in cache while its experts pass."""
        T, k = self.shape
        expert = self.idx.reshape(-1)  # (T*k,)
        key = expert
        if T > NATIVE_TILE:
            tile = torch.div(torch.arange(T * k, device=expert.device), k * NATIVE_TILE, rounding_mode="floor")
            key = tile * (self.num_experts + 1) + expert
        order = torch.sort(key, stable=True).indices
        return order, torch.div(order, k, rounding_mode="floor"), expert.index_select(0, order)

    @functools.cached_property
    def dense(self) -> DensePlan:
        return DensePlan(self.idx, self.num_experts)

    @functools.cached_property
    def sorted(self) -> Segments:
        return Segments.build(self.idx, self.num_experts)

    @functools.cached_property
    def runs(self) -> RunPlan | None:
        run = _common_run_length(self.idx)
        return RunPlan(self.idx[::run].contiguous(), run, self.num_experts) if run >= MIN_RUN else None

    @functools.cached_property
    def blocks(self) -> BlockPlan | None:
        """These rows in padded blocks, for the torch walk when segments average under MIN_SEGMENT rows (many
        experts with few tokens each); None when one mm per segment is the faster walk."""
        rows = self.sorted
        if len(rows.pair) >= MIN_SEGMENT * len(rows.segments):
            return None
        return BlockPlan.build(rows.pair, rows.expert, rows.counts, self.shape)

    def shrink(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        walk = self.walk(A.shape[1], x, A)
        if walk in ("dense", "runs", "blocks"):
            return getattr(self, walk).shrink(x, A)
        u = torch.zeros(self.num_pairs, A.shape[1], dtype=accum_dtype(x.dtype), device=x.device)
        if walk == "compiled":
            pair, token, expert = self.tiled
            native.shrink(x, A, expert, token, pair, u)
            return u
        rows = self.sorted
        u_sorted = x.new_empty(len(rows.pair), A.shape[1])  # (P, r)
        for e, start, stop in rows.segments:
            torch.mm(x.index_select(0, rows.token[start:stop]), A[e].t(), out=u_sorted[start:stop])
        return u.index_copy_(0, rows.pair, u_sorted.to(u.dtype))

    def expand(self, u: torch.Tensor, B: torch.Tensor, coef: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        fresh = out is None
        walk = self.walk(u.shape[1], u, B) if fresh else self.walk(u.shape[1], u, B, out)
        if walk == "dense":
            return self.dense.expand(u, B, coef, out)
        if walk == "compiled" and not (fresh or out.is_contiguous()):
            walk = self.torch_walk  # the kernels write in place: into a new output (zeroed tile by tile, where the
            # rows are about to be used) or a contiguous one
        if walk == "compiled":
            pair, token, expert = self.tiled
            target = torch.empty(self.shape[0], B.shape[1], dtype=u.dtype, device=u.device) if fresh else out
            Bt = B.transpose(1, 2)  # (E, r, out): read in place within one tile; for many tiles' runs contiguous
            Bt = Bt if self.shape[0] <= NATIVE_TILE else Bt.contiguous()  # (a no-op for a rank-major bank's B)
            native.expand(u, _as(coef, u.dtype), Bt, expert, token, pair, NATIVE_TILE, target, accumulate=not fresh)
            return target
        if walk == "runs":
            return self.runs.expand(u, B, coef, out)
        if fresh:
            out = torch.zeros(self.shape[0], B.shape[1], dtype=u.dtype, device=u.device)
        if walk == "blocks":
            return self.blocks.expand(u, B, coef, out)
        rows = self.sorted
        scaled = (u * coef[:, None]).index_select(0, rows.pair).to(B.dtype)  # (P, r) sorted
        for e, start, stop in rows.segments:
            # A token's k slots are added in sorted order; CPU index_add_ runs sequentially, hence deterministic.
            out.index_add_(0, rows.token[start:stop], torch.mm(scaled[start:stop], B[e].t()).to(out.dtype))
        return out

    def outer(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        walk = self.walk(left.shape[1], left, right)
        if walk in ("dense", "runs", "blocks"):
            return getattr(self, walk).outer(left, right)
        g = torch.zeros(self.num_experts, left.shape[1], right.shape[1], dtype=left.dtype, device=left.device)
        if walk == "compiled":
            pair, token, expert = self.tiled
            native.outer(left.index_select(0, pair), right, expert, token, g)
            return g
        rows = self.sorted
        left_sorted = left.index_select(0, rows.pair)  # (P, a)
        for e, start, stop in rows.segments:
            rows_e = right.index_select(0, rows.token[start:stop]).to(left.dtype)  # (n_e, b)
            torch.mm(left_sorted[start:stop].t(), rows_e, out=g[e])
        return g


@dataclass(frozen=True)
class DensePlan:
    """Every expert of a narrow bank side by side: shrink is one matmul of the tokens with the bank's A as an
    [E*r, in] matrix, then each pair's r columns picked; expand spreads each pair's scaled rank-r row into its expert's
    columns of a [T, E*r] matrix (a token's k slots summed there) and adds one matmul with B as [E*r, out]."""

    idx: torch.Tensor  # (T, k), -1 = none
    num_experts: int

    @functools.cached_property
    def slot_experts(self) -> torch.Tensor:
        """(T, k, 1): the expert of each pair, -1 read as 0 (those pairs' rows are zeroed)."""
        return self.idx.clamp(min=0).unsqueeze(2)

    @functools.cached_property
    def empty(self) -> torch.Tensor | None:
        """(T*k, 1) True where a pair has no expert; None when every pair has one."""
        empty = (self.idx < 0).reshape(-1, 1)
        return empty if bool(empty.any()) else None

    def _valid_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.empty is None else rows.masked_fill(self.empty, 0)

    def _spread(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [T*k, a] -> [T, E*a]: each pair's row in its expert's a columns (rows of one token's slots that share
        an expert add up)."""
        (T, k), a = self.idx.shape, rows.shape[1]
        spread = rows.new_zeros(T, self.num_experts, a)
        return spread.scatter_add_(1, self.slot_experts.expand(T, k, a), rows.view(T, k, a)).view(T, -1)

    def shrink(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        (T, k), (E, r, d_in) = self.idx.shape, A.shape
        every = _as(torch.nn.functional.linear(x, A.reshape(E * r, d_in)), accum_dtype(x.dtype))  # (T, E*r)
        u = every.view(T, E, r).gather(1, self.slot_experts.expand(T, k, r))  # (T, k, r)
        return self._valid_rows(u.view(T * k, r))

    def expand(self, u: torch.Tensor, B: torch.Tensor, coef: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        E, d_out, r = B.shape
        dtype = u.dtype if out is None else out.dtype
        spread = _as(self._spread(self._valid_rows(u * coef[:, None])), dtype)  # (T, E*r)
        bank = _as(B.transpose(1, 2).reshape(E * r, d_out), dtype)  # (E*r, out); a view of a rank-major B
        return torch.mm(spread, bank) if out is None else out.addmm_(spread, bank)

    def outer(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        a, b = left.shape[1], right.shape[1]
        spread = self._spread(self._valid_rows(left))  # (T, E*a)
        return torch.mm(spread.t(), _as(right, left.dtype)).view(self.num_experts, a, b)


@dataclass(frozen=True)
class UniformPlan:
    """Every token routes to the same k experts (a single token, or one row expanded over the tokens): shrink is one
    matmul over all tokens with the k experts' A side by side (for k = 1 a view of the bank), expand one matmul with
    their B^T side by side; nothing sorted, nothing read back from the device per call. Where the coefficients come
    as floats (`float_coefficients`: one expert, or one token with up to FLOAT_SLOTS experts, as a router's top-k in
    decoding), `bind` gives the layer's whole forward as each slot's two matmuls on views of the bank, the
    coefficient as alpha."""

    experts: tuple[int, ...]  # (k,) -1 = none
    index: torch.Tensor  # (k,) the experts, -1 read as 0 (its pairs are masked)
    num_tokens: int
    num_experts: int

    @functools.cached_property
    def float_coefficients(self) -> bool:
        """`bind` takes the coefficients as one float per slot (shared by every token)."""
        return len(self.experts) == 1 or (self.num_tokens == 1 and len(self.experts) <= FLOAT_SLOTS)

    def bind(self, A: torch.Tensor, B: torch.Tensor, coef: tuple[float, ...]) -> BoundSlots:
        """This plan's forward on the bank (A, B) with one coefficient per slot."""
        slots = tuple((A[e], B[e].t(), c) for e, c in zip(self.experts, coef) if e >= 0)  # B[e]^T: (r, out)
        return BoundSlots(slots, B.shape[1], accum_dtype(A.dtype) == A.dtype)

    def walk(self, rank: int, *tensors: torch.Tensor) -> str:
        return "uniform"

    def _side_by_side(self, W: torch.Tensor) -> torch.Tensor:
        """W [E, r, n] -> the k experts' [r, n] stacked, [k*r, n]; for k = 1 a view of W, no copy."""
        if len(self.experts) == 1:
            return W[max(self.experts[0], 0)]
        return W.index_select(0, self.index).flatten(0, 1)

    def shrink(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        u = _as(torch.nn.functional.linear(x, self._side_by_side(A)), accum_dtype(x.dtype))  # (T, k*r) = (T*k, r)
        if len(self.experts) == 1:
            return u if self.experts[0] >= 0 else u.zero_()
        T, k, r = self.num_tokens, len(self.experts), A.shape[1]
        if -1 in self.experts:
            u.view(T, k, r)[:, [j for j, e in enumerate(self.experts) if e < 0]] = 0
        return u.view(T * k, r)

    def expand(self, u: torch.Tensor, B: torch.Tensor, coef: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        dtype = u.dtype if out is None else out.dtype
        T, k = self.num_tokens, len(self.experts)
        Bt = _as(self._side_by_side(B.transpose(1, 2)), dtype)  # (k*r, out); contiguous for a rank-major B
        scaled = _as(u * coef.unsqueeze(1), dtype)  # (T*k, r); empty slots: coef 0
        if k > 1:
            scaled = scaled.view(T, -1)  # (T, k*r)
        return torch.mm(scaled, Bt) if out is None else out.addmm_(scaled, Bt)

    def outer(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        T, k, a, b = self.num_tokens, len(self.experts), left.shape[1], right.shape[1]
        g = torch.zeros(self.num_experts, a, b, dtype=left.dtype, device=left.device)
        right = right.to(left.dtype)
        if k == 1:
            if self.experts[0] >= 0:
                torch.mm(left.t(), right, out=g[self.experts[0]])
            return g
        per_slot = torch.bmm(left.view(T, k, a).permute(1, 2, 0), right.expand(k, T, b))  # (k, a, b)
        valid = [j for j, e in enumerate(self.experts) if e >= 0]
        return g.index_add_(0, self.index[valid], per_slot[valid])  # an expert in several slots: summed


@dataclass(frozen=True)
class BoundSlots:
    """A UniformPlan's shrink and expand on one bank, coefficients as floats: for each slot with an expert, views of
    its A [r, in] and B^T [r, out] and its coefficient. Called with x [T, in] and out [T, out] in x's dtype (or None:
    a new delta); each slot is one matmul each way, the k slots summed in the output."""

    slots: tuple[tuple[torch.Tensor, torch.Tensor, float], ...]
    out_features: int
    full_precision: bool  # the bank (so x and out) in fp32 / fp64: no cast anywhere

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if self.full_precision:  # the two matmuls per slot, nothing else (a layer's call adds into its base output)
            target = x.new_zeros(x.shape[0], self.out_features) if out is None else out
            for A_e, Bt_e, c in self.slots:
                target.addmm_(torch.nn.functional.linear(x, A_e), Bt_e, alpha=c)
            return target
        acc = accum_dtype(x.dtype)  # half precision: rank-r products accumulated in fp32
        target = x.new_zeros(x.shape[0], self.out_features, dtype=acc) if out is None else out
        for A_e, Bt_e, c in self.slots:
            u = _as(torch.nn.functional.linear(x, A_e), acc)  # (T, r)
            if out is None:
                target.addmm_(u, _as(Bt_e, acc), alpha=c)
            else:  # into the half-precision out: scaled in fp32, then cast
                target.addmm_(_as(u * c, out.dtype), Bt_e)
        return target if out is not None else _as(target, x.dtype)


@dataclass(frozen=True)
class BlockPlan:
    """Valid (token, slot) pairs grouped by expert into nb blocks of `block` rows; P valid pairs out of T*k.

    Padded row i of the block layout holds pair src_pair[i] of token token[i]. Padding rows point at the dummy pair
    T*k (a zero row where read, a discarded row where written) and at token 0, where their products are zero.
    """

    src_pair: torch.Tensor  # (nb * block,)
    token: torch.Tensor  # (nb * block,)
    block_expert: torch.Tensor  # (nb,) expert of each block
    block: int
    num_tokens: int
    num_pairs: int  # T*k
    num_experts: int

    @classmethod
    def build(cls, order: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor,
              shape: tuple[int, int]) -> BlockPlan:
        (T, k), device = shape, order.device
        block = _block_size(len(order), int((counts > 0).sum()))
        blocks = (counts + block - 1) // block  # (E,) blocks per expert
        rank_in_expert = torch.arange(len(order), device=device) - (torch.cumsum(counts, 0) - counts)[experts]
        rows = (torch.cumsum(blocks, 0) - blocks)[experts] * block + rank_in_expert  # padded row of each sorted pair
        block_expert = torch.repeat_interleave(torch.arange(len(counts), device=device), blocks)
        src_pair = torch.full((block_expert.numel() * block,), T * k, dtype=torch.long, device=device)
        src_pair[rows] = order
        token = torch.div(src_pair, k, rounding_mode="floor").masked_fill_(src_pair == T * k, 0)
        return cls(src_pair, token, block_expert, block, T, T * k, len(counts))

    def chunks(self, width: int, itemsize: int) -> Iterator[tuple[slice, slice]]:
        """(block slice, padded-row slice) pairs covering all blocks, ~CHUNK_BYTES of `width`-wide rows each."""
        per_chunk = max(1, CHUNK_BYTES // (width * itemsize * self.block))
        for first in range(0, self.block_expert.numel(), per_chunk):
            last = min(first + per_chunk, self.block_expert.numel())
            yield slice(first, last), slice(first * self.block, last * self.block)

    def shrink(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        E, r, d_in = A.shape
        u = torch.zeros(self.num_pairs + 1, r, dtype=accum_dtype(x.dtype), device=x.device)  # + the dummy pair's row
        At = A.transpose(1, 2).contiguous()  # (E, in, r)
        for blocks, rows in self.chunks(d_in, x.element_size()):
            xs = x.index_select(0, self.token[rows]).view(-1, self.block, d_in)  # (nb_c, block, in)
            us = torch.bmm(xs, At.index_select(0, self.block_expert[blocks]))  # (nb_c, block, r)
            u.index_copy_(0, self.src_pair[rows], us.view(-1, r).to(u.dtype))
        return u[:-1]

    def expand(self, u: torch.Tensor, B: torch.Tensor, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        E, d_out, r = B.shape
        scaled = _with_zero_row(u * coef[:, None]).to(B.dtype)  # (T*k + 1, r)
        Bt = B.transpose(1, 2).contiguous()  # (E, r, out)
        for blocks, rows in self.chunks(d_out, out.element_size()):
            us = scaled.index_select(0, self.src_pair[rows]).view(-1, self.block, r)  # (nb_c, block, r)
            ys = torch.bmm(us, Bt.index_select(0, self.block_expert[blocks]))  # (nb_c, block, out)
            # A token's k slots are added in sorted order; CPU index_add_ runs sequentially, hence deterministic.
            out.index_add_(0, self.token[rows], ys.view(-1, d_out).to(out.dtype))
        return out

    def outer(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        a, b = left.shape[1], right.shape[1]
        g = torch.zeros(self.num_experts, a, b, dtype=left.dtype, device=left.device)
        padded_left = _with_zero_row(left)
        for blocks, rows in self.chunks(a + b, left.element_size()):
            ls = padded_left.index_select(0, self.src_pair[rows]).view(-1, self.block, a)  # (nb_c, block, a)
            rs = right.index_select(0, self.token[rows]).to(left.dtype).view(-1, self.block, b)  # (nb_c, block, b)
            g.index_add_(0, self.block_expert[blocks], torch.bmm(ls.transpose(1, 2), rs))  # an expert's blocks summed
        return g


def _block_size(num_pairs: int, active_experts: int) -> int:
    """A power of two near the mean segment length, in [8, 256]: little padding, few blocks."""
    mean = num_pairs // max(active_experts, 1)
    return 1 << (min(max(mean, 8), 256).bit_length() - 1)


def _with_zero_row(t: torch.Tensor) -> torch.Tensor:
    """t with one zero row appended: what padding rows (src_pair == T*k) read."""
    return torch.cat([t, t.new_zeros(1, t.shape[1])])


Plan = SegmentPlan | UniformPlan
