"""The CPU path of `grouped_lora`, and the reference the Triton kernels are held to.

`plan` picks one of two layouts for a routing; both are walked with batched matmuls, never a Python loop over experts:
- `RunPlan`, for routings that are constant over runs of consecutive tokens (a batch routed per row: one adapter for
  every token, an adapter per request, a retrieval mixture, a LoraHub population). The tokens are cut into C chunks
  of L rows (L = the gcd of the run lengths) and each slot is one bmm over the chunks with each chunk's expert
  weights gathered (r x in per chunk, small next to L x in activations). No activation row is gathered or
  scattered: the output is updated in place by baddbmm, at the memory cost of a plain LoRA.
- `BlockPlan`, for any per-token routing (a router's top-k). Pairs are sorted by expert once (stable) and laid out in
  blocks of `block` rows that each belong to one expert (an expert's last block is padded); the blocks are walked in
  chunks whose rows fit in cache (~512 KiB), since this op is bound by memory traffic, not by its few flops.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

CHUNK_BYTES = 1 << 19
MIN_RUN = 16  # shorter runs gather more weight rows than the activation rows they save


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the input's own precision otherwise (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def plan(idx: torch.Tensor, num_experts: int) -> RunPlan | BlockPlan:
    run = _common_run_length(idx)
    if run >= MIN_RUN:
        return RunPlan(idx[::run].contiguous(), run, num_experts)
    return BlockPlan.build(idx, num_experts)


def shrink(x: torch.Tensor, A: torch.Tensor, plan: RunPlan | BlockPlan) -> torch.Tensor:
    return plan.shrink(x, A)


def expand(u: torch.Tensor, B: torch.Tensor, coef: torch.Tensor, plan: RunPlan | BlockPlan,
           out: torch.Tensor) -> torch.Tensor:
    return plan.expand(u, B, coef, out)


def outer(left: torch.Tensor, right: torch.Tensor, plan: RunPlan | BlockPlan) -> torch.Tensor:
    return plan.outer(left, right)


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
    """Tokens cut into C = T / L chunks of L consecutive rows; chunk c routes all its tokens to chunk_idx[c]."""

    chunk_idx: torch.Tensor  # (C, k), -1 = none
    run: int  # L
    num_experts: int

    def _slots(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(slot j, the experts of slot j per chunk with -1 clamped to 0) for each slot with at least one expert."""
        for j in range(self.chunk_idx.shape[1]):
            experts = self.chunk_idx[:, j]
            if bool((experts >= 0).any()):
                yield j, experts.clamp(min=0)

    def shrink(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        (C, k), L, r = self.chunk_idx.shape, self.run, A.shape[1]
        u = torch.zeros(C, L, k, r, dtype=accum_dtype(x.dtype), device=x.device)
        xs = x.reshape(C, L, -1)
        for j, experts in self._slots():
            u[:, :, j] = torch.bmm(xs, A.index_select(0, experts).transpose(1, 2))  # (C, L, r)
        u.permute(0, 2, 1, 3)[self.chunk_idx < 0] = 0  # pairs without an expert read nothing
        return u.view(C * L * k, r)

    def expand(self, u: torch.Tensor, B: torch.Tensor, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        (C, k), L, r = self.chunk_idx.shape, self.run, B.shape[2]
        scaled = (u * coef[:, None]).to(out.dtype).view(C, L, k, r)
        scaled.permute(0, 2, 1, 3)[self.chunk_idx < 0] = 0  # pairs without an expert add nothing
        target = out if out.is_contiguous() else out.contiguous()
        ys = target.view(C, L, -1)
        for j, experts in self._slots():
            ys.baddbmm_(scaled[:, :, j], B.index_select(0, experts).to(out.dtype).transpose(1, 2))
        return target if target is out else out.copy_(target)

    def outer(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        (C, k), L, a, b = self.chunk_idx.shape, self.run, left.shape[1], right.shape[1]
        g = torch.zeros(self.num_experts, a, b, dtype=left.dtype, device=left.device)
        ls = left.view(C, L, k, a)
        rs = right.reshape(C, L, b).to(left.dtype)
        for j, experts in self._slots():
            valid = self.chunk_idx[:, j] >= 0
            per_chunk = torch.bmm(ls[:, :, j].transpose(1, 2), rs)  # (C, a, b)
            g.index_add_(0, experts[valid], per_chunk[valid])
        return g


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
    def build(cls, idx: torch.Tensor, num_experts: int) -> BlockPlan:
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
        return cls(src_pair, token, block_expert, block, T, T * k, num_experts)

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
