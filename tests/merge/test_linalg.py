"""Decompositions against dense SVDs computed in float64 with numpy."""

import numpy as np
import pytest
import torch

from lorahub_engine.merge.linalg import dense_factors, lowrank_svd, shared_basis


def best_rank_k(m: np.ndarray, k: int) -> np.ndarray:
    U, S, Vt = np.linalg.svd(m, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vt[:k]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("out,R,inp,k", [(20, 6, 15, 3), (5, 12, 9, 4), (30, 8, 4, None), (7, 3, 7, 10)])
def test_lowrank_svd_is_the_best_rank_k(out, R, inp, k):
    B, A = randn(out, R, seed=1), randn(R, inp, seed=2)
    B2, A2 = lowrank_svd(B, A, k)
    dense = (B @ A).numpy()
    kk = min(R, out, inp) if k is None else min(k, R, out, inp)
    assert B2.shape == (out, kk) and A2.shape == (kk, inp)
    np.testing.assert_allclose((B2 @ A2).numpy(), best_rank_k(dense, kk), atol=1e-10)
    np.testing.assert_allclose((A2 @ A2.T).numpy(), np.eye(kk), atol=1e-10)  # A' = V^T has orthonormal rows


def test_dense_factors_exact_keeps_numerical_rank():
    m = randn(12, 3, seed=3) @ randn(3, 10, seed=4)  # rank 3
    B, A = dense_factors(m)
    assert B.shape[1] == 3
    torch.testing.assert_close(B @ A, m)
    B, A = dense_factors(m.float(), rank=2)
    np.testing.assert_allclose((B @ A).double().numpy(), best_rank_k(m.numpy(), 2), atol=1e-5)
    assert dense_factors(torch.zeros(4, 5))[0].shape == (4, 1)  # rank 0 still yields one column


def test_shared_basis_reconstructs_each_task_and_matches_the_dense_svd():
    Bs = [randn(16, r, seed=10 + r) for r in (2, 3, 4)]
    As = [randn(r, 11, seed=20 + r) for r in (2, 3, 4)]
    U, S, coords = shared_basis(Bs, As)
    for B, A, V in zip(Bs, As, coords):
        torch.testing.assert_close((U * S) @ V, B @ A)
    np.testing.assert_allclose((U.T @ U).numpy(), np.eye(U.shape[1]), atol=1e-10)
    concat = np.concatenate([(B @ A).numpy() for B, A in zip(Bs, As)], axis=1)  # (out, n * in)
    np.testing.assert_allclose(S.numpy(), np.linalg.svd(concat, compute_uv=False)[:9], atol=1e-10)
    V_all = torch.cat(coords, dim=1)  # (K, n * in): rows are orthonormal right singular vectors
    np.testing.assert_allclose((V_all @ V_all.T).numpy(), np.eye(9), atol=1e-10)


@pytest.mark.parametrize("k", [2, 7, 60])  # 2 and 7: Lanczos (ARPACK); 60: full SVD
def test_dense_factors_truncation_is_the_best_rank_k(k):
    m = randn(200, 30, seed=5) @ randn(30, 150, seed=6) + 0.1 * randn(200, 150, seed=7)
    B, A = dense_factors(m.float(), rank=k)
    assert B.shape == (200, k) and A.shape == (k, 150)
    np.testing.assert_allclose((B @ A).double().numpy(), best_rank_k(m.numpy(), k), atol=1e-4)  # entries up to ~40, fp32
    np.testing.assert_allclose((A @ A.T).numpy(), np.eye(k), atol=1e-5)  # A = V^T: orthonormal rows
