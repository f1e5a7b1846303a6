"""Errors of the retrieval package; all derive from lorahub_engine's AdapterError."""

from lorahub_engine.errors import AdapterError


class RetrievalError(AdapterError):
    """A retrieval request or file is invalid: unknown names, k larger than the index, a missing or corrupt index."""


class EmbedderMismatchError(RetrievalError):
    """An index is used with another embedder, prefix or dimension than the one it was built with."""
