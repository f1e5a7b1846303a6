"""The @triton.jit kernels of the Triton backend; launchers and metadata live in triton_backend.py.

Index legend: p = t * k + j a (token, slot) pair, e expert, r rank. Work is cut into "blocks": runs of at most
BLOCK_M consecutive entries of `order` (pair ids sorted by expert) that all belong to one expert. A block table
row is (expert, start, end) into `order`; expert == -1 marks a surplus program, which exits at once, and
expert == E (shrink and expand only) a run of idx == -1 pairs, whose rows get zeros, so outputs need no memset.
Row masks that depend on the loaded expert are built as vectors (rows * 0 + e): the interpreter rejects a mask
that combines a vector with a scalar condition.
Only plain pointer arithmetic with masks is used (no block pointers), so the same code runs on Triton 3.6-3.9
and under TRITON_INTERPRET=1. Accumulation is fp32. shrink multiplies its inputs in their own dtype (half x half
products are exact in fp32); expand and outer meet an fp32 operand (u, or the coefficient-weighted left), so both
operands go to fp32 and PRECISION is "tf32" for half inputs (every fp16/bf16 value is exact in tf32) and "ieee"
for fp32 inputs (as torch's default matmul).
"""

import triton
import triton.language as tl


@triton.jit
def _block_pairs(order, blk_start, blk_end, e, num_experts, BLOCK_M: tl.constexpr):
    """This program's block: its pair ids, which of its BLOCK_M rows exist (row_ok), and which of those belong to
    a real expert (row_live; off in a run of -1 pairs, whose rows get zeros; a vector mask, see top)."""
    start = tl.load(blk_start + tl.program_id(0))
    end = tl.load(blk_end + tl.program_id(0))
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    row_live = row_ok & ((rows * 0 + e) < num_experts)
    pair = tl.load(order + rows, mask=row_ok, other=0).to(tl.int64)
    return pair, row_ok, row_live


@triton.jit
def shrink_kernel(
    x, A, u, order, blk_expert, blk_start, blk_end,
    num_slots, num_experts, d_in, rank,
    sx_t, sx_i, sa_e, sa_r, sa_i, su_p, su_r,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """u[p, r-tile] = A[e] @ x[t] for the pairs of one block; fp32 accumulate."""
    e = tl.load(blk_expert + tl.program_id(0))
    if e < 0:
        return
    pair, row_ok, row_live = _block_pairs(order, blk_start, blk_end, e, num_experts, BLOCK_M)
    e = tl.minimum(e, num_experts - 1)
    tok = pair // num_slots
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < rank
    a_base = A + e.to(tl.int64) * sa_e
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < d_in
        xt = tl.load(x + tok[:, None] * sx_t + kk[None, :] * sx_i, mask=row_live[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_base + kk[:, None] * sa_i + rr[None, :] * sa_r, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc += tl.dot(xt, at, input_precision=PRECISION)  # (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_R)
    out_ok = row_ok[:, None] & r_ok[None, :]
    tl.store(u + pair[:, None] * su_p + rr[None, :] * su_r, acc.to(u.dtype.element_ty), mask=out_ok)


@triton.jit
def expand_kernel(
    u, B, coef, y, order, blk_expert, blk_start, blk_end,
    num_experts, rank, d_out,
    su_p, su_r, sb_e, sb_o, sb_r, sy_p, sy_o,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """y[p, n-tile] = coef[p] * B[e] @ u[p] for the pairs of one block; the gate is applied in the epilogue."""
    e = tl.load(blk_expert + tl.program_id(0))
    if e < 0:
        return
    pair, row_ok, row_live = _block_pairs(order, blk_start, blk_end, e, num_experts, BLOCK_M)
    e = tl.minimum(e, num_experts - 1)
    nn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = nn < d_out
    b_base = B + e.to(tl.int64) * sb_e
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        bt = tl.load(b_base + rr[:, None] * sb_r + nn[None, :] * sb_o, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        ut = tl.load(u + pair[:, None] * su_p + rr[None, :] * su_r, mask=row_live[:, None] & r_ok[None, :], other=0.0)
        # (BLOCK_M, BLOCK_R) @ (BLOCK_R, BLOCK_N)
        acc += tl.dot(ut.to(tl.float32), bt.to(tl.float32), input_precision=PRECISION)
    c = tl.load(coef + pair, mask=row_live, other=0.0)
    acc = acc * c[:, None]
    out_ok = row_ok[:, None] & n_ok[None, :]
    tl.store(y + pair[:, None] * sy_p + nn[None, :] * sy_o, acc.to(y.dtype.element_ty), mask=out_ok)


@triton.jit
def outer_partial_kernel(
    left, right, part, order, chk_expert, chk_start, chk_end,
    num_slots, dim_a, dim_b,
    sl_p, sl_a, sr_t, sr_b, sp_c, sp_a, sp_b,
    BLOCK_P: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PRECISION: tl.constexpr,
):
    """part[c, a-tile, b-tile] = sum over the chunk's pairs of left[p]^T right[t], looping BLOCK_P pairs at a time."""
    e = tl.load(chk_expert + tl.program_id(0))
    if e < 0:
        return
    start = tl.load(chk_start + tl.program_id(0))
    end = tl.load(chk_end + tl.program_id(0))
    aa = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    bb = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    a_ok = aa < dim_a
    b_ok = bb < dim_b
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        row_ok = rows < end
        pair = tl.load(order + rows, mask=row_ok, other=0).to(tl.int64)
        tok = pair // num_slots
        rt = tl.load(right + tok[:, None] * sr_t + bb[None, :] * sr_b, mask=row_ok[:, None] & b_ok[None, :], other=0.0)
        lt = tl.load(left + pair[None, :] * sl_p + aa[:, None] * sl_a, mask=a_ok[:, None] & row_ok[None, :], other=0.0)
        # (BLOCK_A, BLOCK_P) @ (BLOCK_P, BLOCK_B)
        acc += tl.dot(lt.to(tl.float32), rt.to(tl.float32), input_precision=PRECISION)
    c = tl.program_id(0).to(tl.int64)
    tl.store(part + c * sp_c + aa[:, None] * sp_a + bb[None, :] * sp_b, acc, mask=a_ok[:, None] & b_ok[None, :])


@triton.jit
def outer_reduce_kernel(part, g, first_chunk, num_chunks, numel, BLOCK: tl.constexpr):
    """g[e] = sum of part[c] over expert e's chunks, in chunk order (deterministic; no atomics)."""
    e = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    first = tl.load(first_chunk + e)
    count = tl.load(num_chunks + e)
    ptr = part + first.to(tl.int64) * numel + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(count):
        acc += tl.load(ptr, mask=ok, other=0.0)
        ptr += numel
    tl.store(g + e.to(tl.int64) * numel + offs, acc.to(g.dtype.element_ty), mask=ok)
