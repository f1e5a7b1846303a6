"""The GPU path of `grouped_lora`: metadata built on the device, and the launchers of the kernels in triton_kernels.py.

plan: pairs p = t * k + j get key idx (or E for -1, so they sort last); one stable sort by key gives `order`;
searchsorted on the sorted keys gives each expert's segment; segments are cut into single-expert blocks of at most
BLOCK_M pairs (and, for weight gradients, chunks of at most CHUNK pairs). Tables are sized by an upper bound known
on the host (ceil(P / BLOCK_M) + min(E + 1, P) rows), so nothing waits on the device; surplus rows have expert -1.
Blocks of -1 pairs keep expert E: shrink and expand write their rows as zeros, so no output needs a memset.
The k slots of a token are summed after expand by a plain reduction over a per-pair buffer: deterministic, no
atomics. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import torch
import triton

from lorahub_engine.ops import triton_kernels as kernels

CHUNK = 256  # pairs per program in `outer`; partial sums of chunks are reduced per expert in chunk order
BLOCK_P = 32  # pairs per step inside an `outer` chunk
BLOCK_K = 64  # reduction tile of shrink (over in)
BLOCK_N = 64  # output tile of expand (over out)
BLOCK_AB = 64  # output tile of outer (over b; and over a when a is large)
MAX_BLOCK_R = 64  # rank tile; larger ranks loop (expand) or add programs (shrink)


@dataclass(frozen=True)
class Table:
    """Single-expert runs of `order`: row i covers order[start[i]:end[i]], all of expert[i].

    expert[i] == -1: a surplus row (no work); == E: a run of idx == -1 pairs (block tables only).
    """

    expert: torch.Tensor  # (rows,) int32
    start: torch.Tensor  # (rows,) int32
    end: torch.Tensor  # (rows,) int32
    first: torch.Tensor  # (E,) int32, first row of each expert
    count: torch.Tensor  # (E,) int32, rows of each expert (0 for an empty expert)


@dataclass(frozen=True)
class Plan:
    order: torch.Tensor  # (T*k,) int32 pair ids sorted by expert, -1 pairs last
    seg: torch.Tensor  # (E+2,) int32: expert e owns order[seg[e]:seg[e+1]]; segment E holds the -1 pairs
    blocks: Table  # runs of at most block_m pairs, for shrink and expand
    block_m: int
    num_tokens: int
    num_slots: int
    num_experts: int

    @cached_property
    def chunks(self) -> Table:
        """Runs of at most CHUNK pairs, for outer: built at the first backward (a forward without grad needs none)."""
        return _table(self.seg, CHUNK, self.num_tokens * self.num_slots, none_rows=False)


def plan(idx: torch.Tensor, num_experts: int) -> Plan:
    _check_device(idx)
    T, k = idx.shape
    num_pairs = T * k
    key = torch.where((idx < 0) | (idx >= num_experts), num_experts, idx).reshape(-1)  # (P,) -1 -> E sorts last
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(num_experts + 2, device=idx.device, dtype=sorted_key.dtype)
    # (E+2,) expert e owns order[seg[e]:seg[e+1]]; segment E holds the -1 pairs
    seg = torch.searchsorted(sorted_key, bounds, out_int32=True)
    block_m = _block_m(num_pairs, num_experts)
    return Plan(
        order=order.to(torch.int32),
        seg=seg,
        blocks=_table(seg, block_m, num_pairs, none_rows=True),
        block_m=block_m,
        num_tokens=T,
        num_slots=k,
        num_experts=num_experts,
    )


def shrink(x: torch.Tensor, A: torch.Tensor, plan: Plan) -> torch.Tensor:
    _check_dtype(x)
    A = A.contiguous()  # rows of A read whole (the backward's B^T is already so for a rank-major bank's B)
    E, R, d_in = A.shape
    u = torch.empty(plan.num_tokens * plan.num_slots, R, dtype=_accum_dtype(x), device=x.device)  # every row written
    block_r = _block_r(R)
    grid = (len(plan.blocks.expert), triton.cdiv(R, block_r))
    kernels.shrink_kernel[grid](
        x, A, u, plan.order, plan.blocks.expert, plan.blocks.start, plan.blocks.end,
        plan.num_slots, plan.num_experts, d_in, R,
        *x.stride(), *A.stride(), *u.stride(),
        BLOCK_M=plan.block_m, BLOCK_R=block_r, BLOCK_K=_tile(d_in, BLOCK_K), PRECISION=_precision(x),
    )
    return u


def expand(u: torch.Tensor, B: torch.Tensor, coef: torch.Tensor, plan: Plan,
           out: torch.Tensor | None) -> torch.Tensor:
    if B.stride(1) != 1 and B.stride(2) != 1:
        B = B.contiguous()  # read in place: contiguous, or rank-major (a bank's B; the backward's A^T view)
    E, d_out, R = B.shape
    T, k = plan.num_tokens, plan.num_slots
    per_pair = torch.empty(T * k, d_out, dtype=_accum_dtype(B), device=u.device)  # (T*k, out), every row written
    coef = coef.to(per_pair.dtype).contiguous()
    block_n = _tile(d_out, BLOCK_N)
    grid = (len(plan.blocks.expert), triton.cdiv(d_out, block_n))
    kernels.expand_kernel[grid](
        u, B, coef, per_pair, plan.order, plan.blocks.expert, plan.blocks.start, plan.blocks.end,
        plan.num_experts, R, d_out,
        *u.stride(), *B.stride(), *per_pair.stride(),
        BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_R=_block_r(R), PRECISION=_precision(B),
    )
    delta = per_pair if k == 1 else per_pair.view(T, k, d_out).sum(1)  # (T, out): fixed-order sum over slots
    return delta if out is None else out.add_(delta.to(out.dtype))


def outer(left: torch.Tensor, right: torch.Tensor, plan: Plan) -> torch.Tensor:
    dim_a, dim_b = left.shape[1], right.shape[1]
    E = plan.num_experts
    rows = len(plan.chunks.expert)
    part = torch.empty(rows, dim_a, dim_b, dtype=torch.float32, device=left.device)  # (chunks, a, b) partial sums
    block_a, block_b = _tile(dim_a, BLOCK_AB), _tile(dim_b, BLOCK_AB)
    grid = (rows, triton.cdiv(dim_a, block_a), triton.cdiv(dim_b, block_b))
    kernels.outer_partial_kernel[grid](
        left, right, part, plan.order, plan.chunks.expert, plan.chunks.start, plan.chunks.end,
        plan.num_slots, dim_a, dim_b,
        *left.stride(), *right.stride(), *part.stride(),
        BLOCK_P=BLOCK_P, BLOCK_A=block_a, BLOCK_B=block_b, PRECISION=_precision(right),
    )
    g = torch.empty(E, dim_a, dim_b, dtype=left.dtype, device=left.device)
    numel = dim_a * dim_b
    reduce_block = min(1024, _pow2(numel))
    kernels.outer_reduce_kernel[(E, triton.cdiv(numel, reduce_block))](
        part, g, plan.chunks.first, plan.chunks.count, numel, BLOCK=reduce_block
    )
    return g


def _table(seg: torch.Tensor, size: int, num_pairs: int, none_rows: bool) -> Table:
    """Cut each segment order[seg[e]:seg[e+1]] into runs of at most `size` pairs, on the device, in int32.

    seg has E+2 entries: segment E holds the -1 pairs; its runs keep expert E if `none_rows`, else become -1 like
    the padding rows past the last run.
    """
    num_experts = seg.numel() - 2
    counts = seg[1:] - seg[:-1]  # (E+1,)
    runs = torch.div(counts + size - 1, size, rounding_mode="floor")  # (E+1,) runs per segment
    last = torch.cumsum(runs, 0, dtype=torch.int32)  # (E+1,) one past each segment's last run
    first = last - runs
    rows = triton.cdiv(num_pairs, size) + min(num_experts + 1, num_pairs)  # >= sum(runs), known on the host
    row = torch.arange(max(rows, 1), device=seg.device, dtype=last.dtype)
    expert = torch.searchsorted(last, row, right=True, out_int32=True)  # (rows,) in [0, E+1]; E+1 = padding
    seg_of_row = expert.clamp(max=num_experts)
    start = seg[seg_of_row] + (row - first[seg_of_row]) * size
    end = torch.minimum(start + size, seg[seg_of_row + 1])
    expert = torch.where(expert < num_experts + int(none_rows), expert, -1)
    return Table(expert, start, end, first[:num_experts], runs[:num_experts])  # all int32, as built


def _block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block: about the mean pairs per expert, clamped to [16, 64] (16 is tl.dot's smallest tile)."""
    return _tile(num_pairs // max(num_experts, 1), 64)


def _block_r(rank: int) -> int:
    return _tile(rank, MAX_BLOCK_R)


def _tile(n: int, most: int) -> int:
    """The power of two covering n, clamped to [16, most] (16 is tl.dot's smallest tile)."""
    return max(16, min(most, _pow2(n)))


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def _accum_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the triton backend takes float16, bfloat16 or float32, got {t.dtype}; use backend='torch'")


def _check_device(idx: torch.Tensor) -> None:
    if not idx.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")
