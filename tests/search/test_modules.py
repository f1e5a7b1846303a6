"""Which adapters a search composes: LoraHub's seeded random draw, or retrieval scores summed over the inputs."""

import random

import pytest

from lorahub_engine.search import SearchError, random_modules, retrieved_modules

NAMES = [f"m{i}" for i in range(30)]


class TableIndex:
    """search(texts, k): a fixed ranking per text (name, score), best first."""

    def __init__(self, table):
        self.table = table

    def search(self, texts, k):
        return [self.table[t][:k] for t in texts]


def test_random_modules_is_a_seeded_draw_without_repeats():
    picked = random_modules(NAMES, 20, seed=3)
    assert picked == random.Random(3).sample(NAMES, 20) and len(set(picked)) == 20
    assert random_modules(NAMES, 20, seed=3) == picked and random_modules(NAMES, 20, seed=4) != picked
    assert sorted(random_modules(NAMES[:5], 5, seed=0)) == NAMES[:5]


@pytest.mark.parametrize("n", [0, 31, 2.0, True])
def test_random_modules_refuses_impossible_draws(n):
    with pytest.raises(SearchError, match="cannot draw"):
        random_modules(NAMES, n)


def test_retrieved_modules_sums_scores_over_the_texts():
    index = TableIndex({"x": [("a", 0.9), ("b", 0.5), ("c", 0.4)],
                        "y": [("c", 0.8), ("b", 0.6), ("d", 0.1)]})
    # n = 2: each text's top 2 count: a 0.9, b 0.5 + 0.6, c 0.8
    assert retrieved_modules(index, ["x", "y"], 2) == ["b", "a"]
    # n = 3: a 0.9, b 1.1, c 1.2, d 0.1
    assert retrieved_modules(index, ["x", "y"], 3) == ["c", "b", "a"]
    assert retrieved_modules(index, ["x"], 10) == ["a", "b", "c"]  # fewer when the index has fewer
    with pytest.raises(SearchError, match="positive int"):
        retrieved_modules(index, ["x"], 0)
    with pytest.raises(SearchError, match="at least one text"):
        retrieved_modules(index, [], 3)
