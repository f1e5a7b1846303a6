"""Static composition of LoRA adapters: `merge` and the methods it knows, registered by name in `METHODS`."""

from lorahub_engine.merge.api import merge
from lorahub_engine.merge.lorahub_factors import lorahub_factors
from lorahub_engine.merge.registry import METHODS

__all__ = ["METHODS", "lorahub_factors", "merge"]
