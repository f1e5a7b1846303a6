"""lorahub-engine: compose, retrieve, search and route LoRA adapters through one grouped LoRA op."""

from lorahub_engine.adapter import LoraAdapter, LoraModule
from lorahub_engine.attach import (
    attach,
    attached,
    attached_names,
    detach,
    init_adapter,
    merge_into_base,
    read_adapters,
    routing,
    set_weights,
)
from lorahub_engine.compose import retrieve_and_compose
from lorahub_engine.errors import (
    AdapterError,
    AdapterFileError,
    AdapterFormatError,
    IncompatibleModelError,
    MergeError,
    NonFiniteError,
    UnsupportedFeatureError,
)
from lorahub_engine.merge import merge
from lorahub_engine.ops import grouped_lora
from lorahub_engine.search import SearchResult, fit_weights, lorahub_search
from lorahub_engine.zoo import AdapterZoo

__all__ = [
    "AdapterError",
    "AdapterFileError",
    "AdapterFormatError",
    "AdapterZoo",
    "IncompatibleModelError",
    "LoraAdapter",
    "LoraModule",
    "MergeError",
    "NonFiniteError",
    "SearchResult",
    "UnsupportedFeatureError",
    "attach",
    "attached",
    "attached_names",
    "detach",
    "fit_weights",
    "grouped_lora",
    "init_adapter",
    "lorahub_search",
    "merge",
    "merge_into_base",
    "read_adapters",
    "retrieve_and_compose",
    "routing",
    "set_weights",
]
