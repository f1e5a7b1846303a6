"""The CPU path of `grouped_lora`, and the reference the Triton kernels are held to.

Pairs are sorted by expert once per plan (stable) and laid out in blocks of `block` rows that each belong to one
expert (an expert's last block is padded), so each primitive is a batched matmul over blocks, whatever E is. The
blocks are walked in chunks whose intermediate rows fit in cache (~512 KiB): on a CPU this op is bound by memory
traffic, not by its few flops (K = r is tiny), so nothing as large as the activations is materialized twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

CHUNK_BYTES = 1 << 19


@dataclass(frozen=True)
class Plan:
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

    def chunks(self, width: int, itemsize: int) -> Iterator[tuple[slice, slice]]:
        """(block slice, padded-row slice) pairs covering all blocks, ~CHUNK_BYTES of `width`-wide rows each."""
        per_chunk = max(1, CHUNK_BYTES // (width * itemsize * self.block))
        for first in range(0, self.block_expert.numel(), per_chunk):
            last = min(first + per_chunk, self.block_expert.numel())
            yield slice(first, last), slice(first * self.block, last * self.block)


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
    token = torch.div(src_pair, k, rounding_mode="floor").masked_fill_(src_pair == T * k, 0)
    return Plan(src_pair, token, block_expert, block, T, T * k, num_experts)


def _block_size(num_pairs: int, active_experts: int) -> int:
    """A power of two near the mean segment length, in [8, 256]: little padding, few blocks."""
    mean = num_pairs // max(active_experts, 1)
    return 1 << (min(max(mean, 8), 256).bit_length() - 1)


def _with_zero_row(t: torch.Tensor) -> torch.Tensor:
    """t with one zero row appended: what padding rows (src_pair == T*k) read."""
    return torch.cat([t, t.new_zeros(1, t.shape[1])])


def shrink(x: torch.Tensor, A: torch.Tensor, plan: Plan) -> torch.Tensor:
    E, r, d_in = A.shape
    u = torch.zeros(plan.num_pairs + 1, r, dtype=accum_dtype(x.dtype), device=x.device)  # + the dummy pair's row
    At = A.transpose(1, 2).contiguous()  # (E, in, r)
    for blocks, rows in plan.chunks(d_in, x.element_size()):
        xs = x.index_select(0, plan.token[rows]).view(-1, plan.block, d_in)  # (nb_c, block, in)
        us = torch.bmm(xs, At.index_select(0, plan.block_expert[blocks]))  # (nb_c, block, r)
        u.index_copy_(0, plan.src_pair[rows], us.view(-1, r).to(u.dtype))
    return u[:-1]


def expand(u: torch.Tensor, B: torch.Tensor, coef: torch.Tensor, plan: Plan, out: torch.Tensor) -> torch.Tensor:
    E, d_out, r = B.shape
    scaled = _with_zero_row(u * coef[:, None]).to(B.dtype)  # (T*k + 1, r)
    Bt = B.transpose(1, 2).contiguous()  # (E, r, out)
    for blocks, rows in plan.chunks(d_out, out.element_size()):
        us = scaled.index_select(0, plan.src_pair[rows]).view(-1, plan.block, r)  # (nb_c, block, r)
        ys = torch.bmm(us, Bt.index_select(0, plan.block_expert[blocks]))  # (nb_c, block, out)
        # A token's k slots are added in sorted order; CPU index_add_ runs sequentially, hence deterministic.
        out.index_add_(0, plan.token[rows], ys.view(-1, d_out).to(out.dtype))
    return out


def outer(left: torch.Tensor, right: torch.Tensor, plan: Plan) -> torch.Tensor:
    a, b = left.shape[1], right.shape[1]
    g = torch.zeros(plan.num_experts, a, b, dtype=left.dtype, device=left.device)
    padded_left = _with_zero_row(left)
    for blocks, rows in plan.chunks(a + b, left.element_size()):
        ls = padded_left.index_select(0, plan.src_pair[rows]).view(-1, plan.block, a)  # (nb_c, block, a)
        rs = right.index_select(0, plan.token[rows]).to(left.dtype).view(-1, plan.block, b)  # (nb_c, block, b)
        g.index_add_(0, plan.block_expert[blocks], torch.bmm(ls.transpose(1, 2), rs))  # an expert's blocks summed
    return g
