"""Retrieval of adapters per input: sentence embeddings of sample inputs, a faiss index, a learned alternative."""

from retrieval.config import IndexConfig
from retrieval.embedder import DEFAULT_NAME, TASK_PREFIX, Embedder, EmbedderSpec
from retrieval.errors import EmbedderMismatchError, RetrievalError
from retrieval.index import AdapterIndex
from retrieval.learned import LearnedConfig, LearnedRetriever, compare_with_centroids

__all__ = [
    "DEFAULT_NAME",
    "TASK_PREFIX",
    "AdapterIndex",
    "EmbedderMismatchError",
    "Embedder",
    "EmbedderSpec",
    "IndexConfig",
    "LearnedConfig",
    "LearnedRetriever",
    "RetrievalError",
    "compare_with_centroids",
]
