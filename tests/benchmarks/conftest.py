import pytest

import lorahub_engine as le
from benchmarks.bases import load_tiny
from benchmarks.training import TrainSpec
from benchmarks.taskworld_zoo import ZooRecipe, build_zoo
from tests.benchmarks.micro import MICRO, ZOO_TASKS


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory):
    """The micro base and a 4-adapter zoo trained on it (3 steps each), built once per session in a temp cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAHUB_CACHE", str(tmp_path_factory.mktemp("cache")))
        base = load_tiny(MICRO, progress=False)
        folder = build_zoo(base, ZOO_TASKS, ZooRecipe(train=TrainSpec(steps=3, rows_per_adapter=2)), progress=False)
    return base, le.AdapterZoo.load(folder)
