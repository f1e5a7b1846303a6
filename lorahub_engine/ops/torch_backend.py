"""The CPU path of `grouped_lora`, and the reference the Triton kernels are held to.

Pairs are sorted by expert once per call (stable) and laid out in blocks of `block` rows that each belong to one
expert (the last block of an expert is zero-padded), so every primitive is a single batched matmul over blocks:
no Python loop over experts, whatever E is. Padding costs at most one block per active expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Plan:
    """Valid (token, slot) pairs grouped by expert into nb blocks of `block` rows; P valid pairs out of T*k.

    Padded row i of the block layout holds pair src_pair[i] of token dst_token[i]. Padding rows point at the dummy
    pair T*k and the dummy token T (extra rows, zero where read and discarded where written), and read token 0
    (src_token) where they gather from x: any real row does, as its products are discarded.
    """

    src_pair: torch.Tensor  # (nb * block,)
    dst_token: torch.Tensor  # (nb * block,)
    src_token: torch.Tensor  # (nb * block,)
    block_expert: torch.Tensor  # (nb,) expert of each block
    block: int
    num_tokens: int
    num_pairs: int  # T*k
    num_experts: int
    all_valid: bool  # no idx == -1: every per-pair row gets written, so buffers need no zero fill


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the input's own precision otherwise (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def plan(idx: torch.Tensor, num_experts: int) -> Plan:
    T, k = idx.shape
    experts, order = torch.sort(idx.reshape(-1), stable=True)
    first_valid = int((experts < 0).sum())
    order, experts = order[first_valid:], experts[first_valid:]  # (P,)
    counts = torch.bincount(experts, minlength=num_experts)  # (E,)
    block = _block_size(len(order), int((counts > 0).sum()))
    blocks = (counts + block - 1) // block  # (E,) blocks per expert
    rank_in_expert = torch.arange(len(order), device=idx.device) - (torch.cumsum(counts, 0) - counts)[experts]
    rows = (torch.cumsum(blocks, 0) - blocks)[experts] * block + rank_in_expert  # padded row of each sorted pair
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=idx.device), blocks)
    src_pair = torch.full((block_expert.numel() * block,), T * k, dtype=torch.long, device=idx.device)
    src_pair[rows] = order
    dst_token = torch.div(src_pair, k, rounding_mode="floor")  # the dummy pair T*k maps to the dummy token T
    src_token = dst_token.masked_fill(dst_token == T, 0)
    return Plan(src_pair, dst_token, src_token, block_expert, block, T, T * k, num_experts, first_valid == 0)


def _block_size(num_pairs: int, active_experts: int) -> int:
    """A power of two near the mean segment length, in [8, 256]: little padding, few blocks."""
    mean = num_pairs // max(active_experts, 1)
    return 1 << (min(max(mean, 8), 256).bit_length() - 1)


def _with_dummy_row(rows: int, width: int, dtype: torch.dtype, device, zero: bool) -> torch.Tensor:
    """(rows + 1, width): the real rows plus the dummy row padding writes to."""
    return (torch.zeros if zero else torch.empty)(rows + 1, width, dtype=dtype, device=device)


def shrink(x: torch.Tensor, A: torch.Tensor, plan: Plan) -> torch.Tensor:
    u = _with_dummy_row(plan.num_pairs, A.shape[1], accum_dtype(x.dtype), x.device, zero=not plan.all_valid)
    if plan.block_expert.numel():
        xs = x.index_select(0, plan.src_token).view(-1, plan.block, x.shape[1])  # (nb, block, in)
        At = A.transpose(1, 2).contiguous().index_select(0, plan.block_expert)  # (nb, in, r)
        u.index_copy_(0, plan.src_pair, torch.bmm(xs, At).view(-1, A.shape[1]).to(u.dtype))
    return u[:-1]


def expand(u: torch.Tensor, B: torch.Tensor, coef: torch.Tensor, plan: Plan) -> torch.Tensor:
    y = _with_dummy_row(plan.num_tokens, B.shape[1], u.dtype, u.device, zero=True)  # (T + 1, out)
    if plan.block_expert.numel():
        scaled = torch.cat([u * coef[:, None], u.new_zeros(1, u.shape[1])]).to(B.dtype)  # (T*k + 1, r)
        us = scaled.index_select(0, plan.src_pair).view(-1, plan.block, u.shape[1])  # (nb, block, r)
        Bt = B.transpose(1, 2).contiguous().index_select(0, plan.block_expert)  # (nb, r, out)
        # Summing the k slots of a token in a fixed (sorted) order; CPU index_add_ is sequential, so deterministic.
        y.index_add_(0, plan.dst_token, torch.bmm(us, Bt).view(-1, B.shape[1]).to(u.dtype))
    return y[:-1]


def outer(left: torch.Tensor, right: torch.Tensor, plan: Plan) -> torch.Tensor:
    g = torch.zeros(plan.num_experts, left.shape[1], right.shape[1], dtype=left.dtype, device=left.device)
    if plan.block_expert.numel():
        padded = torch.cat([left, left.new_zeros(1, left.shape[1])])  # padding rows read the zero row
        ls = padded.index_select(0, plan.src_pair).view(-1, plan.block, left.shape[1])  # (nb, block, a)
        rs = right.index_select(0, plan.src_token).to(left.dtype).view(-1, plan.block, right.shape[1])  # (nb, block, b)
        g.index_add_(0, plan.block_expert, torch.bmm(ls.transpose(1, 2), rs))  # an expert's blocks summed
    return g
