"""Which N adapters a LoraHub search composes: LoraHub's random draw, or retrieval on the examples' inputs."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from lorahub_engine.compose import retrieve
from lorahub_engine.search.errors import SearchError


def random_modules(names: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """n distinct names drawn uniformly with `random.Random(seed)` (LoraHub: 20 of the library, per seed)."""
    names = list(names)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(names):
        raise SearchError(f"cannot draw {n!r} modules from {len(names)} adapters")
    return random.Random(seed).sample(names, n)


def retrieved_modules(index, texts: Sequence[str], n: int) -> list[str]:
    """The n adapters with the highest summed retrieval score over `texts` (each text's top n count); fewer if
    the index returns fewer. index: anything with `search(texts, k) -> [[(name, score), ...], ...]`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SearchError(f"the number of modules must be a positive int, got {n!r}")
    texts = list(texts)
    if not texts:
        raise SearchError("retrieval needs at least one text")
    total: dict[str, float] = defaultdict(float)
    for row in retrieve(index, texts, n):
        for name, score in row:
            total[name] += score
    return sorted(total, key=total.get, reverse=True)[:n]
