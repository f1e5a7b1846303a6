"""Shared fixtures: the real bundled MiniLM embedder (loaded once per session) and synthetic clustered vectors."""

import numpy as np
import pytest

from retrieval import Embedder


@pytest.fixture(scope="session")
def embedder():
    return Embedder()


def clustered(n, d, n_clusters, seed, noise=0.3):
    """Unit vectors around `n_clusters` random centres: [n, d] float32 (like adapters in skill families)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    vectors = centres[rng.integers(n_clusters, size=n)] + noise * rng.standard_normal((n, d))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def exact_top_k(vectors, queries, k):
    """Reference: ids and scores of the k largest inner products, by numpy."""
    scores = queries @ vectors.T  # [m, n]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)
