"""Errors of the routers package: part of the core's AdapterError family."""

from lorahub_engine.errors import AdapterError


class RouterError(AdapterError):
    """A router request is invalid: bad config, experts that do not match a saved router, unreadable files."""
