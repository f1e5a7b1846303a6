"""A learned alternative to nearest-centroid retrieval: logistic regression over sample-input embeddings.

Each adapter is a class; its ~20 sample inputs are the training points. Scores are class probabilities, so
`search` returns [(adapter name, probability), ...] like AdapterIndex. `compare_with_centroids` measures both on
the same held-out queries.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from retrieval.config import IndexConfig
from retrieval.embedder import Embedder
from retrieval.errors import RetrievalError
from retrieval.index import AdapterIndex, Hits
from retrieval.samples import adapter_samples, centroids, embed_samples, normalize


@dataclass(frozen=True)
class LearnedConfig:
    C: float = 10.0  # inverse L2 strength; unit-norm inputs need a weak prior to separate close tasks
    max_iter: int = 2000

    def __post_init__(self):
        if not self.C > 0 or self.max_iter < 1:
            raise RetrievalError(f"C must be > 0 and max_iter >= 1, got {self}")

    def to_json(self) -> dict:
        return asdict(self)


class LearnedRetriever:
    """Scores adapters with a multinomial logistic regression; learned state ends in `_`."""

    def __init__(self, config: LearnedConfig | None = None, embedder: Embedder | None = None):
        self.config = config or LearnedConfig()
        self.embedder = embedder

    def fit(self, source, progress: bool | None = None) -> LearnedRetriever:
        """Train on a zoo (or adapters, or a mapping name -> sample inputs)."""
        if self.embedder is None:
            self.embedder = Embedder()
        samples = adapter_samples(source)
        vectors, owner = embed_samples(self.embedder, samples, progress)
        return self.fit_embeddings(vectors, [list(samples)[i] for i in owner])

    def fit_embeddings(self, vectors: np.ndarray, labels: Sequence[str]) -> LearnedRetriever:
        """Train on sample vectors [n, d] with their adapter names [n]; needs at least two adapters."""
        if len(set(labels)) < 2:
            raise RetrievalError("a learned retriever needs samples of at least two adapters")
        model = LogisticRegression(C=self.config.C, max_iter=self.config.max_iter)
        self.model_ = model.fit(normalize(vectors), np.asarray(labels))
        self.names_ = [str(c) for c in model.classes_]
        return self

    def search(self, texts: Sequence[str], k: int = 3, exclude: Collection[str] = ()) -> Hits:
        if self.embedder is None:
            raise RetrievalError("fit() first, or pass an embedder, to search texts")
        return self.search_embeddings(self.embedder.encode(texts), k, exclude)

    def search_embeddings(self, queries: np.ndarray, k: int = 3, exclude: Collection[str] = ()) -> Hits:
        """Per query vector, the k most probable adapters (name, probability); `exclude` names are skipped."""
        if not hasattr(self, "model_"):
            raise RetrievalError("this retriever is not fitted")
        unknown = set(exclude) - set(self.names_)
        if unknown:
            raise RetrievalError(f"no adapters named {sorted(unknown)} in the retriever")
        if not isinstance(k, int) or not 1 <= k <= len(self.names_) - len(set(exclude)):
            raise RetrievalError(f"k={k!r} must be in 1..{len(self.names_) - len(set(exclude))}")
        if len(queries) == 0:
            return []
        probs = self.model_.predict_proba(normalize(queries))  # [m, n_adapters]
        probs[:, [self.names_.index(name) for name in exclude]] = -np.inf
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.names_[j], float(row[j])) for j in order] for row, order in zip(probs, top)]


def top1_accuracy(hits: Hits, truth: Sequence[str]) -> float:
    return float(np.mean([bool(h) and h[0][0] == t for h, t in zip(hits, truth)]))


def compare_with_centroids(train: Mapping[str, Sequence[str]], queries: Mapping[str, Sequence[str]],
                           embedder: Embedder | None = None, config: LearnedConfig | None = None) -> dict:
    """Top-1 accuracy of nearest-centroid (AdapterIndex, exact) and logistic regression on the same queries.

    `train` maps adapter name -> sample inputs; `queries` maps adapter name -> held-out inputs whose correct
    answer is that adapter. Every text is embedded once and shared by both retrievers.
    """
    embedder = embedder or Embedder()
    samples = adapter_samples(train)
    unknown = set(queries) - set(samples)
    if unknown:
        raise RetrievalError(f"queries for adapters without training samples: {sorted(unknown)}")
    vectors, owner = embed_samples(embedder, samples, progress=None)
    names = list(samples)
    index = AdapterIndex.from_embeddings(names, centroids(vectors, owner, len(names)), IndexConfig(kind="flat"))
    learned = LearnedRetriever(config, embedder).fit_embeddings(vectors, [names[i] for i in owner])
    truth = [name for name, texts in queries.items() for _ in texts]
    query_vectors = embedder.encode([text for texts in queries.values() for text in texts])
    return {
        "queries": len(truth),
        "adapters": len(names),
        "centroid_top1": top1_accuracy(index.search_embeddings(query_vectors, k=1), truth),
        "logreg_top1": top1_accuracy(learned.search_embeddings(query_vectors, k=1), truth),
    }
