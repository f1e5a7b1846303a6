"""The cross-task LoraHub rows: which modules each searches (random per seed / retrieved for the shots)."""

import pytest

import lorahub_engine as le
from benchmarks.cross_task import run_cross_task
from benchmarks.harness import Settings
from lorahub_engine.search import random_modules
from tests.benchmarks.micro import FakeIndex

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = Settings(n_test=3, max_new_tokens=4)


def test_lorahub_rows_search_random_or_retrieved_modules(micro_zoo):
    base, zoo = micro_zoo
    results = run_cross_task(base, ["count_birds"], ["lorahub", "retrieval_lorahub"], seeds=[0, 1], zoo=zoo,
                             index=FakeIndex(), settings=SETTINGS, progress=False)
    random_row, retrieved_row = results["count_birds"]["lorahub"], results["count_birds"]["retrieval_lorahub"]
    for seed, info in enumerate(random_row["info"]):  # 20 modules wanted, the micro zoo has 4: all, seeded order
        assert info["adapters"] == random_modules(zoo.names, 4, seed=seed)
    for info in retrieved_row["info"]:  # FakeIndex ranks the counting adapters first for "How many" prompts
        assert info["adapters"] == ["count_animal", "has_animal", "add", "plural"]
    for info in random_row["info"] + retrieved_row["info"]:
        assert all(abs(w) <= 1.5 for w in info["weights"]) and info["loss"] <= info["zero_loss"]
    with pytest.raises(le.AdapterError):
        le.attached_names(base.model)  # detached after the search and after answering

