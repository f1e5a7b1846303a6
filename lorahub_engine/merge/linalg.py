"""Decompositions for merges. Low-rank inputs never become dense: thin QRs reduce them to a small core whose SVD gives
the singular vectors. Only a result that is dense by nature (TIES, DARE, magnitude prune on dW) gets a dense SVD.
All functions expect float32 or float64 tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, svds


def lowrank_svd(B: torch.Tensor, A: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD of B @ A without forming it: B (out, R), A (R, in) -> B' = U S (out, k), A' = V^T (k, in).

    B = Q1 R1 and A^T = Q2 R2 (thin QR), so B A = Q1 (R1 R2^T) Q2^T and the SVD of the small core R1 R2^T gives
    U = Q1 Uc, V = Q2 Vc. k = min(rank, R, out, in); rank=None keeps all. B' A' is the best rank-k approximation.
    """
    Q1, R1 = torch.linalg.qr(B)  # (out, m1), (m1, R)
    Q2, R2 = torch.linalg.qr(A.T)  # (in, m2), (m2, R)
    Uc, S, Vch = torch.linalg.svd(R1 @ R2.T, full_matrices=False)  # core (m1, m2)
    k = S.numel() if rank is None else min(rank, S.numel())
    return (Q1 @ Uc[:, :k]) * S[:k], Vch[:k] @ Q2.T


def dense_factors(delta: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor a dense dW (out, in) as B (out, k) @ A (k, in) by truncated SVD.

    rank=None keeps the numerical rank (singular values above max(out, in) * eps * s_max, at least 1), so the
    factorization is exact to working precision; rank=k keeps the best rank-k approximation. A small k
    (4k < min(out, in)) uses Lanczos (ARPACK, to machine precision, fixed start vector) instead of a full SVD:
    the top 16 of a 4096 x 4096 in seconds rather than minutes.
    """
    if rank is not None and 4 * rank < min(delta.shape):
        return _top_singular(delta, rank)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    if rank is None:
        tol = S[0] * max(delta.shape) * torch.finfo(delta.dtype).eps
        rank = max(1, int((S > tol).sum()))
    k = min(rank, S.numel())
    return U[:, :k] * S[:k], Vh[:k]


def _top_singular(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    host = delta.detach().cpu().numpy()
    v0 = np.random.default_rng(0).standard_normal(min(host.shape)).astype(host.dtype)
    try:
        U, S, Vh = svds(host, k=k, v0=v0, tol=0, solver="arpack")
    except ArpackNoConvergence:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return U[:, :k] * S[:k], Vh[:k]
    order = np.argsort(-S)  # svds does not promise an order
    B, A = torch.from_numpy(U[:, order] * S[order]), torch.from_numpy(np.ascontiguousarray(Vh[order]))
    return B.to(delta.device), A.to(delta.device)


def shared_basis(
    Bs: list[torch.Tensor], As: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """KnOTS' shared basis: SVD of the concatenation [B_1 A_1, ..., B_n A_n] (out, n*in), from the factors.

    Bs[i] (out, r_i), As[i] (r_i, in) -> U (out, K), S (K,), coords[i] (K, in) with B_i A_i = U diag(S) coords[i]
    exactly. The concatenation is B_cat blockdiag(A_i); B_cat = Q1 R1 and A_i^T = Q2_i R2_i give the core
    R1 blockdiag(R2_i^T), whose SVD Uc S Vc^T yields U = Q1 Uc and coords[i] = (Vc^T)[:, block i] Q2_i^T.
    """
    Q1, R1 = torch.linalg.qr(torch.cat(Bs, dim=1))  # (out, m), (m, R)
    Q2s, R2s = zip(*(torch.linalg.qr(A.T) for A in As))  # (in, m_i), (m_i, r_i)
    core = R1 @ torch.block_diag(*(R2.T for R2 in R2s))  # (m, sum m_i)
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)  # Vch (K, sum m_i)
    blocks = Vch.split([Q2.shape[1] for Q2 in Q2s], dim=1)
    return Q1 @ Uc, S, [block @ Q2.T for block, Q2 in zip(blocks, Q2s)]
