"""Sample inputs per adapter, their embeddings, and adapter centroids (normalized mean of sample embeddings)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from retrieval.embedder import Embedder
from retrieval.errors import RetrievalError


def adapter_samples(source) -> dict[str, list[str]]:
    """name -> sample inputs, from a mapping, an AdapterZoo or any iterable of adapters (metadata["samples"])."""
    if isinstance(source, Mapping):
        pairs = list(source.items())
    elif isinstance(source, Iterable):
        pairs = [(a.name, a.metadata.get("samples")) for a in source]
    else:
        raise RetrievalError(f"expected a zoo, adapters or a mapping name -> samples, got {type(source).__name__}")
    out: dict[str, list[str]] = {}
    for name, samples in pairs:
        if name in out:
            raise RetrievalError(f"adapter {name!r} appears twice")
        if isinstance(samples, str) or not samples or not all(isinstance(s, str) and s.strip() for s in samples):
            raise RetrievalError(
                f"adapter {name!r} needs a non-empty list of non-empty sample inputs (metadata['samples'])"
            )
        out[name] = list(samples)
    return out


def embed_samples(embedder: Embedder, samples: Mapping[str, Sequence[str]],
                  progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All samples embedded in one batched call: vectors [n_samples, d] and their adapter's position [n_samples]."""
    texts = [text for group in samples.values() for text in group]
    owner = np.repeat(np.arange(len(samples)), [len(group) for group in samples.values()])
    return embedder.encode(texts, progress=progress), owner


def centroids(vectors: np.ndarray, owner: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group, the L2-normalized mean of its vectors: [n_groups, d] float32."""
    sums = np.zeros((n_groups, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, owner, vectors)
    return normalize(sums)


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, contiguous); a zero row is an error."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise RetrievalError("cannot normalize a zero or non-finite embedding")
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)
