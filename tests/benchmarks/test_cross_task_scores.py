"""Cross-task scores of real methods where the answer is known, each prediction recomputed without the harness
(Hugging Face's generate on one prompt at a time, adapters folded into a copy of the base), and the table's upper
bound `upper_task_lora` run for two training steps."""

import contextlib
import copy

import pytest
import torch

import lorahub_engine as le
from benchmarks import methods
from benchmarks.bases import load_tiny
from benchmarks import cross_task
from benchmarks.cross_task import Settings, run_cross_task
from benchmarks.taskworld import format_prompt, get_task
from benchmarks.training import TrainSpec
from benchmarks.taskworld_zoo import TINY_ZOO, ZooRecipe
from tests.benchmarks.micro import FakeIndex

pytestmark = pytest.mark.usefixtures("one_thread")
KNOWN = "sentiment_review"  # the shipped tiny base answers it zero-shot (0.96 over 40 in RESULTS.md)
ADAPTED = "plural"  # the adapter best_single picks for it changes some of the base's answers
N_TEST, NEW_TOKENS = 12, 6


@contextlib.contextmanager
def kept_answers():
    """methods.answer_with wrapped: every (adapter, predictions) a method answered with is kept in the list."""
    answer_with, answered = methods.answer_with, []

    def answer_and_keep(ctx, adapter, info=None):
        output = answer_with(ctx, adapter, info)
        answered.append((adapter, output.predictions))
        return output

    with pytest.MonkeyPatch.context() as m:
        m.setattr(methods, "answer_with", answer_and_keep)
        yield answered


def answers_by_hand(model, base, task: str, n_test: int, max_new_tokens: int) -> list[str]:
    """Hugging Face's greedy generate on each unpadded prompt alone, cut at eos, special tokens dropped."""
    answers = []
    for x, _ in cross_task.test_set(get_task(task), n_test):
        ids = base.tokenizer(base.render(format_prompt(get_task(task).instruction, x)), return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=base.tokenizer.eos_token_id,
                             pad_token_id=base.tokenizer.pad_token_id)
        answers.append(base.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def score_by_hand(model, base, task: str, n_test: int, max_new_tokens: int) -> float:
    """Exact match of `answers_by_hand` after lowercasing, collapsing spaces and dropping edge punctuation."""
    def norm(text: str) -> str:
        return " ".join(text.lower().split()).strip(" .,;:!?'\"")

    truth = [y for _, y in cross_task.test_set(get_task(task), n_test)]
    answers = answers_by_hand(model, base, task, n_test, max_new_tokens)
    return sum(norm(a) == norm(y) for a, y in zip(answers, truth)) / len(truth)


@pytest.fixture(scope="module")
def tiny():
    """The shipped tiny base and zoo; a cross-task run of zero_shot and best_single on KNOWN and ADAPTED, with the
    predictions best_single answered."""
    base, zoo = load_tiny(progress=False), le.AdapterZoo.load(TINY_ZOO)
    with kept_answers() as answered:
        results = run_cross_task(base, [KNOWN, ADAPTED], ["zero_shot", "best_single"], seeds=[0], zoo=zoo,
                                 index=FakeIndex(), settings=Settings(n_test=N_TEST, max_new_tokens=NEW_TOKENS),
                                 progress=False)
    return base, zoo, results, answered


def test_zero_shot_scores_what_the_base_answers(tiny):
    base, _, results, _ = tiny
    expected = score_by_hand(base.model, base, KNOWN, N_TEST, NEW_TOKENS)
    assert expected >= 0.5  # the base knows this task: a scorer stuck at 0, or answers misaligned, fails
    assert results[KNOWN]["zero_shot"]["scores"] == [expected] and results[KNOWN]["zero_shot"]["n_test"] == N_TEST


def test_best_single_answers_with_the_adapter_it_reports(tiny):
    base, zoo, results, answered = tiny
    assert results[KNOWN]["best_single"]["info"][0]["adapters"] == [KNOWN]  # the zoo holds KNOWN's own adapter
    for task, (adapter, predictions) in zip([KNOWN, ADAPTED], answered):
        assert results[task]["best_single"]["info"][0]["adapters"] == [adapter.name]
        merged = le.merge_into_base(copy.deepcopy(base.model), zoo[adapter.name].to(torch.float32))
        assert predictions == answers_by_hand(merged, base, task, N_TEST, NEW_TOKENS)
        assert results[task]["best_single"]["scores"] == [score_by_hand(merged, base, task, N_TEST, NEW_TOKENS)]
    assert answered[1][1] != answers_by_hand(base.model, base, ADAPTED, N_TEST, NEW_TOKENS)  # the adapter acts


def test_upper_task_lora_trains_two_steps_and_answers_with_that_adapter(micro_zoo, monkeypatch):
    base, zoo = micro_zoo
    train_adapters, trained = methods.train_adapters, []

    def train_and_keep(*args, **kwargs):
        adapters, losses = train_adapters(*args, **kwargs)
        trained.append((args[2], adapters, losses))
        return adapters, losses

    spec = TrainSpec(steps=2, rows_per_adapter=2, lr=0.05)  # two large steps: the answers move
    monkeypatch.setattr(methods, "default_recipe", lambda base: ZooRecipe(train=spec))
    monkeypatch.setattr(methods, "train_adapters", train_and_keep)
    task = "count_birds"
    with kept_answers() as answered:
        results = run_cross_task(base, [task], ["upper_task_lora"], seeds=[0, 1], zoo=zoo, index=FakeIndex(),
                                 settings=Settings(n_test=4, max_new_tokens=3), progress=False)
    (used_spec, (adapter,), losses), = trained  # trained once per task, counted for both seeds
    assert used_spec == spec and len(losses) == 2 and adapter.name == task
    (used, predictions), = answered
    assert used is adapter
    merged = le.merge_into_base(copy.deepcopy(base.model), adapter)
    assert predictions == answers_by_hand(merged, base, task, 4, 3)
    assert predictions != answers_by_hand(base.model, base, task, 4, 3)  # the trained adapter acts
    assert results[task]["upper_task_lora"]["scores"] == [score_by_hand(merged, base, task, 4, 3)] * 2
    with pytest.raises(le.AdapterError):
        le.attached_names(base.model)  # detached after answering


def test_static_merges_answer_folded_into_the_base_which_is_restored(micro_zoo):
    """ties answers with its merge folded into the base weights (as Hugging Face answers with merge_into_base on
    a copy) and leaves the base's weights bit for bit as they were; folded restores them after an error too."""
    base, zoo = micro_zoo
    before = {name: t.clone() for name, t in base.model.state_dict().items()}
    task = "count_birds"
    results = run_cross_task(base, [task], ["ties"], seeds=[0], zoo=zoo, index=FakeIndex(),
                             settings=Settings(n_test=4, k=2, max_new_tokens=3), progress=False)
    names = results[task]["ties"]["info"][0]["adapters"]
    adapter = le.merge([zoo[n] for n in names], [1.0] * len(names), "ties", density=0.2, seed=0)
    merged = le.merge_into_base(copy.deepcopy(base.model), adapter)
    assert results[task]["ties"]["first_predictions"] == answers_by_hand(merged, base, task, 3, 3)
    assert results[task]["ties"]["scores"] == [score_by_hand(merged, base, task, 4, 3)]
    assert all(torch.equal(t, before[name]) for name, t in base.model.state_dict().items())
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(RuntimeError, match="inside"), torch.no_grad():
        plain = base.model(ids).logits
        with methods.folded(base.model, adapter):
            folded = base.model(ids).logits
            assert torch.equal(folded, merged(ids).logits) and not torch.allclose(folded, plain)
            raise RuntimeError("inside")
    assert all(torch.equal(t, before[name]) for name, t in base.model.state_dict().items())
