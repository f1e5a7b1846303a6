"""SearchResult: what a LoraHub search found (learned state), kept apart from its SearchConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from lorahub_engine.adapter import LoraAdapter
from lorahub_engine.merge import merge
from lorahub_engine.search.config import SearchConfig


class Evaluation(NamedTuple):
    """One objective evaluation: the weights (adapter order), loss = cross_entropy + l1 * mean |w|."""

    weights: tuple[float, ...]
    loss: float
    cross_entropy: float


@dataclass
class SearchResult:
    """The best evaluated candidate (lowest loss, earliest on ties) and every evaluation in order."""

    names: list[str]  # the searched adapters, in weight order
    weights: dict[str, float]  # best weights per adapter name
    loss: float  # best objective
    cross_entropy: float  # its cross-entropy part
    history: list[Evaluation]
    config: SearchConfig  # (a FitConfig for le.fit_weights): the settings of the final run
    adapters: list[LoraAdapter] = field(repr=False)
    validation: dict | None = None  # with config.folds: what validation compared and picked (validate.Choice)

    def adapter(self, name: str = "lorahub", dtype: torch.dtype | None = None) -> LoraAdapter:
        """The composition as one adapter: le.merge(adapters, weights, "lorahub") (mode "mixture": the exact sum,
        "task_arithmetic"), with the search recorded in its metadata. Save it as a PEFT folder (`.save`) or fold it into the base (`le.merge_into_base`).

        The factors are mixed in fp32, as the search evaluated them on an fp32 model (le.merge alone would round
        the mix of fp16 adapters to fp16); `dtype` casts the result, e.g. torch.float16 for a smaller file.
        """
        sources = [a.to(torch.float32) for a in self.adapters]
        method = "lorahub" if self.config.mode == "fusion" else "task_arithmetic"
        composed = merge(sources, [self.weights[n] for n in self.names], method, name=name)
        if dtype is not None:
            composed = composed.to(dtype)
        composed.metadata["lorahub_search"] = {"config": self.config.to_json(), "loss": self.loss,
                                               "cross_entropy": self.cross_entropy, "weights": self.weights}
        return composed

    def to_json(self) -> dict:
        return {"names": self.names, "weights": self.weights, "loss": self.loss, "cross_entropy": self.cross_entropy,
                "config": self.config.to_json(), "validation": self.validation,
                "history": [e._asdict() for e in self.history]}

