"""Errors of the search package; all derive from lorahub_engine's AdapterError."""

from lorahub_engine.errors import AdapterError


class SearchError(AdapterError):
    """A search request is invalid (no adapters or examples, a bad budget or bound, an unknown optimizer) or its
    optimizer failed."""
