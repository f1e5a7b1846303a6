"""answer_mix: the answer shares by hand, and the zero-shot score and shot counts against the cross-task harness."""

import pytest

from benchmarks.answer_mix import _mix, task_mix
from benchmarks.cross_task import run_cross_task
from benchmarks.harness import Settings
from benchmarks.taskworld import exact_match, get_task
from benchmarks.taskworld.splits import examples
from lorahub_engine.fewshot import generate_answers
from tests.benchmarks.micro import FakeIndex

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = Settings(n_test=6, max_new_tokens=4)


def test_mix_lists_the_most_frequent_normalized_answers():
    assert _mix(["No.", "no", "yes", "no", "maybe", ""], top=2) == "no 0.50, yes 0.17"
    assert _mix([" ", "a"]) == "(empty) 0.50, a 0.50"


def test_task_mix_agrees_with_the_zero_shot_row_and_counts_the_shots_by_hand(micro_zoo):
    base, zoo = micro_zoo
    row = task_mix(base, "count_birds", seeds=2, settings=SETTINGS)
    results = run_cross_task(base, ["count_birds"], ["zero_shot"], seeds=[0], zoo=zoo, index=FakeIndex(),
                             settings=SETTINGS, progress=False)
    assert row["zero_shot"] == results["count_birds"]["zero_shot"]["mean"]
    task = get_task("count_birds")
    for seed, shots in enumerate(row["shots"]):
        pairs = examples(task, "fewshot", SETTINGS.shots, seed=seed)
        assert shots["answers"] == [y for _, y in pairs]
        for x, y in pairs:  # one prompt at a time: no batching shared with task_mix
            [answer] = generate_answers(base.model, base.tokenizer, [base.prompt(task.instruction, x, ())],
                                        max_new_tokens=SETTINGS.max_new_tokens)
            shots["base_right"] -= exact_match(answer, y)
        assert shots["base_right"] == 0
