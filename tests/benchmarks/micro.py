"""What the benchmark tests share: a micro tiny-base spec, a 4-task zoo list and an index with a fixed table."""

from dataclasses import replace

from benchmarks.bases import TinySpec

MICRO = replace(TinySpec(), vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                max_positions=512, steps=2, batch_size=4, warmup_steps=1)
ZOO_TASKS = ["plural", "add", "has_animal", "count_animal"]


class FakeIndex:
    """Retrieval by a fixed table: inputs mentioning 'birds'/'how many' get counting adapters, others lexicon."""

    def search(self, texts, k):
        return [[("count_animal", 0.9), ("has_animal", 0.5), ("add", 0.2), ("plural", 0.1)][:k]
                if "How many" in text else [("plural", 0.8), ("has_animal", 0.3), ("add", 0.2), ("count_animal", 0.1)][:k]
                for text in texts]
