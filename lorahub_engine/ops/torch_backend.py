"""The CPU path of `grouped_lora`, and the reference the Triton kernels are held to.

Pairs are sorted by expert once per call (stable), then each non-empty expert segment is one matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Plan:
    """Valid (token, slot) pairs grouped by expert. P valid pairs out of T*k."""

    order: torch.Tensor  # (P,) pair ids p = t*k + j, sorted by expert
    tokens: torch.Tensor  # (P,) token of each sorted pair
    segments: tuple[tuple[int, int, int], ...]  # (expert, start, end) into `order`, non-empty only
    num_tokens: int
    num_pairs: int  # T*k
    num_experts: int


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the input's own precision otherwise (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def plan(idx: torch.Tensor, num_experts: int) -> Plan:
    T, k = idx.shape
    flat = idx.reshape(-1)
    experts, order = torch.sort(flat, stable=True)
    first_valid = int((experts < 0).sum())
    order, experts = order[first_valid:], experts[first_valid:]
    counts = torch.bincount(experts, minlength=num_experts).tolist()
    segments, start = [], 0
    for e, n in enumerate(counts):
        if n:
            segments.append((e, start, start + n))
            start += n
    return Plan(order, torch.div(order, k, rounding_mode="floor"), tuple(segments), T, T * k, num_experts)


def shrink(x: torch.Tensor, A: torch.Tensor, plan: Plan) -> torch.Tensor:
    u = torch.zeros(plan.num_pairs, A.shape[1], dtype=accum_dtype(x.dtype), device=x.device)
    if not plan.segments:
        return u
    At = A.transpose(1, 2).contiguous()  # (E, in, r): mm on contiguous operands avoids hidden copies
    us = torch.empty(len(plan.order), A.shape[1], dtype=x.dtype, device=x.device)  # (P, r)
    for e, s, t in plan.segments:
        torch.mm(x.index_select(0, plan.tokens[s:t]), At[e], out=us[s:t])
    return u.index_copy_(0, plan.order, us.to(u.dtype))


def expand(u: torch.Tensor, B: torch.Tensor, coef: torch.Tensor, plan: Plan) -> torch.Tensor:
    k = plan.num_pairs // max(plan.num_tokens, 1)
    y_pairs = torch.zeros(plan.num_pairs, B.shape[1], dtype=u.dtype, device=u.device)  # (T*k, out)
    if plan.segments:
        us = (u.index_select(0, plan.order) * coef.index_select(0, plan.order)[:, None]).to(B.dtype)  # (P, r)
        Bt = B.transpose(1, 2).contiguous()  # (E, r, out): mm on contiguous operands avoids hidden copies
        ys = torch.empty(len(plan.order), B.shape[1], dtype=B.dtype, device=u.device)  # (P, out)
        for e, s, t in plan.segments:
            torch.mm(us[s:t], Bt[e], out=ys[s:t])
        y_pairs.index_copy_(0, plan.order, ys.to(u.dtype))  # each pair id once: a copy, not an atomic add
    return y_pairs.view(plan.num_tokens, k, -1).sum(1) if k > 1 else y_pairs  # slots summed in a fixed order


def outer(left: torch.Tensor, right: torch.Tensor, plan: Plan) -> torch.Tensor:
    g = torch.zeros(plan.num_experts, left.shape[1], right.shape[1], dtype=left.dtype, device=left.device)
    for e, s, t in plan.segments:
        rows = right.index_select(0, plan.tokens[s:t]).to(left.dtype)  # (n_e, b)
        torch.mm(left.index_select(0, plan.order[s:t]).t(), rows, out=g[e])
    return g
