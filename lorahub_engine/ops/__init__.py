"""The one grouped LoRA op every composition in the engine runs through."""

from lorahub_engine.ops.grouped import BACKENDS, grouped_lora

__all__ = ["BACKENDS", "grouped_lora"]
