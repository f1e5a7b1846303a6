"""Cross-task scores of real methods where the answer is known, each prediction recomputed without the harness
(Hugging Face's generate on one prompt at a time, adapters folded into a copy of the base), and the table's upper
bound `upper_task_lora` run for two training steps."""

import copy

import pytest
import torch

import lorahub_engine as le
from benchmarks import methods
from benchmarks.bases import load_tiny
from benchmarks.cross_task import Settings, run_cross_task, test_set
from benchmarks.taskworld import format_prompt, get_task
from benchmarks.training import TrainSpec
from benchmarks.zoo import TINY_ZOO, ZooRecipe
from tests.benchmarks.micro import FakeIndex

pytestmark = pytest.mark.usefixtures("one_thread")
TASK, N_TEST, NEW_TOKENS = "sentiment_review", 12, 6  # the shipped tiny base answers TASK zero-shot (0.96 of 40)


def score_by_hand(model, base, task: str, n_test: int, max_new_tokens: int) -> float:
    """Hugging Face's greedy generate on each unpadded prompt alone, cut at eos; exact match after lowercasing,
    collapsing spaces and dropping edge punctuation, written out here."""
    def norm(text: str) -> str:
        return " ".join(text.lower().split()).strip(" .,;:!?'\"")

    hits = []
    for x, y in test_set(get_task(task), n_test):
        ids = base.tokenizer(base.render(format_prompt(get_task(task).instruction, x)), return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=base.tokenizer.eos_token_id,
                             pad_token_id=base.tokenizer.pad_token_id)
        hits.append(norm(base.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)) == norm(y))
    return sum(hits) / len(hits)


@pytest.fixture(scope="module")
def tiny():
    """The shipped tiny base and zoo, and a cross-task run of zero_shot and best_single on TASK."""
    base, zoo = load_tiny(progress=False), le.AdapterZoo.load(TINY_ZOO)
    results = run_cross_task(base, [TASK], ["zero_shot", "best_single"], seeds=[0], zoo=zoo, index=FakeIndex(),
                             settings=Settings(n_test=N_TEST, max_new_tokens=NEW_TOKENS), progress=False)
    return base, zoo, results[TASK]


def test_zero_shot_scores_what_the_base_answers(tiny):
    base, _, results = tiny
    expected = score_by_hand(base.model, base, TASK, N_TEST, NEW_TOKENS)
    assert expected >= 0.5  # the base knows this task: a scorer stuck at 0, or answers misaligned, fails
    assert results["zero_shot"]["scores"] == [expected] and results["zero_shot"]["n_test"] == N_TEST


def test_best_single_finds_the_tasks_own_adapter_and_scores_it(tiny):
    base, zoo, results = tiny
    assert results["best_single"]["info"][0]["adapters"] == [TASK]  # the zoo holds this task's own adapter
    merged = le.merge_into_base(copy.deepcopy(base.model), zoo[TASK].to(torch.float32))
    assert results["best_single"]["scores"] == [score_by_hand(merged, base, TASK, N_TEST, NEW_TOKENS)]


def test_upper_task_lora_trains_two_steps_and_scores_its_adapter(micro_zoo, monkeypatch):
    base, zoo = micro_zoo
    train_adapters, trained = methods.train_adapters, []

    def train_and_keep(*args, **kwargs):
        adapters, losses = train_adapters(*args, **kwargs)
        trained.append((args[2], adapters, losses))
        return adapters, losses

    monkeypatch.setattr(methods, "ZooRecipe", lambda: ZooRecipe(train=TrainSpec(steps=2, rows_per_adapter=2)))
    monkeypatch.setattr(methods, "train_adapters", train_and_keep)
    task = "count_birds"
    results = run_cross_task(base, [task], ["upper_task_lora"], seeds=[0, 1], zoo=zoo, index=FakeIndex(),
                             settings=Settings(n_test=4, max_new_tokens=3), progress=False)
    (spec, (adapter,), losses), = trained  # trained once per task, counted for both seeds
    assert spec.steps == 2 and len(losses) == 2 and adapter.name == task
    assert all(m.B.abs().sum() > 0 for m in adapter.modules.values())  # B starts at zero: the two steps moved it
    with pytest.raises(le.AdapterError):
        le.attached_names(base.model)  # detached after answering
    expected = score_by_hand(le.merge_into_base(copy.deepcopy(base.model), adapter), base, task, 4, 3)
    assert results[task]["upper_task_lora"]["scores"] == [expected, expected]
