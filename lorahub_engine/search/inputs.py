"""What the search and the fit share at their boundary: input checks, and the model prepared for one run."""

from __future__ import annotations

import contextlib

from lorahub_engine.adapter import LoraAdapter
from lorahub_engine.attach import attached
from lorahub_engine.search.errors import SearchError


def check_adapters(adapters, caller: str) -> list[LoraAdapter]:
    """A non-empty list of LoraAdapter, or a SearchError naming `caller`."""
    if isinstance(adapters, LoraAdapter):
        raise SearchError(f"{caller} takes a list of adapters, got a single one")
    adapters = list(adapters)
    if not adapters:
        raise SearchError(f"{caller} needs at least one adapter, got none")
    wrong = [type(a).__name__ for a in adapters if not isinstance(a, LoraAdapter)]
    if wrong:
        raise SearchError(f"adapters must be LoraAdapter objects, got {wrong[0]}")
    return adapters


def check_examples(examples, caller: str) -> list[tuple[str, str]]:
    """A non-empty list of (input, answer) string pairs, or a SearchError naming `caller`."""
    examples = list(examples)
    if not examples:
        raise SearchError(f"{caller} needs at least one (input, answer) example, got none")
    for i, pair in enumerate(examples):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise SearchError(f"examples[{i}] must be an (input, answer) pair of strings, got {pair!r}")
    return [tuple(pair) for pair in examples]


@contextlib.contextmanager
def composing(model, adapters: list[LoraAdapter]):
    """For the block: the adapters attached (frozen), the model in eval mode (no dropout) with its own parameters
    frozen. Afterwards the model is as it was (detached, its mode and requires_grad flags back), on error too."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with attached(model, adapters):
            model.eval()
            model.requires_grad_(False)
            yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(training)
