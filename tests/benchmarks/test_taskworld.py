"""taskworld: task counts, determinism, disjoint splits, answer checks by independent solvers, the public API."""

import random
import re
import sys
import textwrap

import pytest

from benchmarks.taskworld import (
    SPLITS,
    Task,
    TaskError,
    accuracy,
    balanced_accuracy,
    examples,
    exact_match,
    format_prompt,
    get_task,
    list_tasks,
    load_extra_tasks,
    normalize_answer,
    register_task,
    split_of,
    unregister_task,
)
from benchmarks.taskworld import lexicon as lx

BBH_STYLE = {"boolean_expressions", "word_sorting", "object_counting", "navigate", "tracking_shuffled_objects",
             "web_of_lies", "dyck_languages", "multistep_arithmetic"}
ALL_TASKS = list_tasks()


def test_counts_of_tasks_families_and_held_out():
    training, held_out = list_tasks(held_out=False), list_tasks(held_out=True)
    training_families = {get_task(n).family for n in training}
    assert len(training) >= 48 and len(training_families) >= 8
    assert len(held_out) >= 12 and len(BBH_STYLE & set(held_out)) >= 4
    assert set(training) | set(held_out) == set(ALL_TASKS) and not set(training) & set(held_out)
    assert {get_task(n).family for n in held_out} <= training_families  # each shares a training skill family
    assert list_tasks(family="logic", held_out=True) == ["boolean_expressions", "web_of_lies"]


@pytest.mark.parametrize("name", ALL_TASKS)
def test_every_task_gives_short_answers_and_60_distinct_test_inputs(name):
    test = examples(name, "test", 60, seed=0)
    assert len({e.input for e in test}) == 60
    for input_text, answer in test + examples(name, "fewshot", 5, seed=3):
        assert input_text.strip() and answer.strip() and answer == answer.strip()
        assert len(answer) <= 40 and len(answer.split()) <= 12, (name, answer)
        assert normalize_answer(answer) == answer  # answers are already in normal form


def test_examples_are_deterministic_and_seeded():
    assert examples("add", "test", 20, seed=1) == examples("add", "test", 20, seed=1)
    assert examples("add", "test", 20, seed=1) != examples("add", "test", 20, seed=2)
    assert examples("add", "test", 30, seed=1)[:20] == examples("add", "test", 20, seed=1)  # prefix property
    assert examples(get_task("add"), "fewshot", 5, seed=0) == examples("add", "fewshot", 5, seed=0)


@pytest.mark.parametrize("name", ["plural", "add", "word_category", "navigate", "has_fruit"])
def test_splits_are_disjoint_by_input(name):
    inputs = {}
    for split, n in zip(SPLITS, (80, 10, 40)):
        drawn = examples(name, split, n, seed=7)
        assert all(split_of(name, e.input) == split for e in drawn)
        inputs[split] = {e.input for e in drawn}
    assert not inputs["train"] & inputs["test"]
    assert not inputs["train"] & inputs["fewshot"] and not inputs["fewshot"] & inputs["test"]


def test_without_distinct_inputs_may_repeat_and_distinct_runs_out_with_a_clear_error():
    repeated = examples("close_last_bracket", "train", 2000, seed=0, distinct=False)
    assert len({e.input for e in repeated}) < 2000
    with pytest.raises(TaskError, match="distinct"):
        examples("close_last_bracket", "fewshot", 200, seed=0)


def _solve(name: str, text: str) -> str:
    """Independent solvers: parse the input text and compute the answer without the generator's state."""
    words = text.split()
    if name == "add":
        return str(int(words[0]) + int(words[2]))
    if name == "sort_numbers":
        return " ".join(map(str, sorted(map(int, words))))
    if name == "multistep_arithmetic":
        return str(eval(text))  # our own generated digits and + - * ( ) only
    if name == "boolean_expressions":
        return str(eval(text.replace("true", "True").replace("false", "False"))).lower()
    if name == "dyck_languages":
        stack = []
        for b in words:
            stack = stack[:-1] if b in ")]}>" else stack + [b]
        return " ".join({"(": ")", "[": "]", "{": "}", "<": ">"}[b] for b in reversed(stack))
    if name == "navigate":
        x = y = 0
        for n, direction in re.findall(r"take (\d+) steps? (\w+)", text):
            dx, dy = {"forward": (0, 1), "backward": (0, -1), "left": (-1, 0), "right": (1, 0)}[direction]
            x, y = x + dx * int(n), y + dy * int(n)
        return "yes" if x == y == 0 else "no"
    if name == "tracking_shuffled_objects":
        held = dict(re.findall(r"(\w+) has a (\w+) ball", text))
        for a, b in re.findall(r"(\w+) and (\w+) swap balls", text):
            held[a], held[b] = held[b], held[a]
        return held[re.search(r"what color is (\w+)'s ball", text).group(1)]
    if name == "web_of_lies":
        first, honest = re.match(r"(\w+) (tells the truth|lies)\.", text).groups()
        truthful = {first: honest == "tells the truth"}
        for speaker, subject, claim in re.findall(r"(\w+) says (\w+) (tells the truth|lies)", text):
            truthful[speaker] = truthful[subject] == (claim == "tells the truth")
        return "yes" if truthful[re.search(r"does (\w+) tell", text).group(1)] else "no"
    if name == "object_counting":
        category = {"fruits": "fruit", "vegetables": "vegetable", "animals": "animal", "musical": "instrument"}[
            re.search(r"how many (\w+)", text).group(1)]
        amounts = {"a": 1, "an": 1, "two": 2, "three": 3}
        items = re.findall(r"(an|a|two|three) (\w+)", text.split(".")[0])
        return str(sum(amounts[n] for n, w in items if lx.CATEGORY_OF.get(lx.SINGULAR_OF.get(w, w)) == category))
    raise KeyError(name)


@pytest.mark.parametrize("name", ["add", "sort_numbers", "multistep_arithmetic", "boolean_expressions",
                                  "dyck_languages", "navigate", "tracking_shuffled_objects", "web_of_lies",
                                  "object_counting"])
def test_answers_agree_with_an_independent_solver(name):
    for input_text, answer in examples(name, "test", 60, seed=0):
        assert _solve(name, input_text) == answer, input_text


def test_lexicon_tables():
    assert lx.PLURAL_OF["mouse"] == "mice" and lx.PLURAL_OF["cherry"] == "cherries"
    assert lx.PLURAL_OF["bus"] == "buses" and lx.PLURAL_OF["knife"] == "knives"
    assert lx.OPPOSITE_OF[lx.OPPOSITE_OF["hot"]] == "hot"
    assert len(set(lx.ZORBISH_OF.values())) == len(lx.ZORBISH_OF)
    assert not set(lx.ZORBISH_OF.values()) & set(lx.WORDS)


@pytest.fixture
def count_fruits():
    def make(rng: random.Random):
        k = rng.randint(1, 6)
        items = [rng.choice(lx.ALL_NOUNS) for _ in range(k)]
        return " ".join(items), str(sum(lx.CATEGORY_OF[w] == "fruit" for w in items))

    task = register_task(Task(name="count_fruits", family="counting", held_out=True,
                              instruction="How many fruits are in the list?", make_example=make))
    yield task
    unregister_task("count_fruits")


def test_user_task_joins_the_registry(count_fruits):
    assert get_task("count_fruits") is count_fruits
    assert "count_fruits" in list_tasks(held_out=True, family="counting")
    assert "count_fruits" not in list_tasks(held_out=False)
    assert len(examples("count_fruits", "test", 10, seed=0)) == 10
    with pytest.raises(TaskError, match="already registered"):
        register_task(count_fruits)


def test_unknown_and_malformed_tasks_raise_clear_errors():
    with pytest.raises(TaskError, match="did you mean plural"):
        get_task("plurals")
    with pytest.raises(TaskError, match="task name"):
        Task(name="bad name", family="x", held_out=False, instruction="do", make_example=lambda rng: ("a", "b"))
    with pytest.raises(TaskError, match="callable"):
        Task(name="bad", family="x", held_out=False, instruction="do", make_example="not a function")
    with pytest.raises(TaskError, match="unknown split"):
        examples("add", "validation", 3)
    broken = Task(name="broken", family="x", held_out=True, instruction="do", make_example=lambda rng: ("a", 1))
    with pytest.raises(TaskError, match="broken"):
        examples(broken, "test", 1)


def test_load_extra_tasks_imports_a_user_module(tmp_path, monkeypatch):
    (tmp_path / "my_tasks_mod.py").write_text(textwrap.dedent('''
        from benchmarks.taskworld import Task, register_task
        register_task(Task(name="echo_word", family="strings", held_out=True, instruction="Repeat the word.",
                           make_example=lambda rng: (w := rng.choice(["sun", "moon", "star", "sky"] * 50), w)))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert load_extra_tasks("my_tasks_mod") == ["echo_word"]
    finally:
        unregister_task("echo_word")
        sys.modules.pop("my_tasks_mod", None)
    with pytest.raises(TaskError, match="cannot import"):
        load_extra_tasks("no_such_module_here")


def test_scoring_and_prompt_format():
    assert normalize_answer("  Cats. ") == "cats" and normalize_answer("'1  3 9'") == "1 3 9"
    assert normalize_answer(") ]") == ") ]" and normalize_answer("-5") == "-5"
    assert exact_match("Yes!", "yes") and not exact_match("yes no", "yes")
    assert accuracy(["cats", "dog", "Mice."], ["cats", "dogs", "mice"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy([], [])


def test_balanced_accuracy_weighs_each_answer_equally():
    answers = ["no"] * 6 + ["yes"] * 2
    assert accuracy(["No."] * 8, answers) == pytest.approx(0.75)
    assert balanced_accuracy(["No."] * 8, answers) == pytest.approx(0.5)  # one answer for all: 1 / classes
    assert balanced_accuracy(["no"] * 3 + ["yes"] * 3 + ["yes", "no"], answers) == pytest.approx((3 / 6 + 1 / 2) / 2)
    assert balanced_accuracy([str(i) for i in range(9)], [str(i) for i in range(9)]) is None  # 9 answers: no classes
    with pytest.raises(ValueError):
        balanced_accuracy(["a"], [])
    assert format_prompt("Add.", "1 + 2") == "Add.\ninput: 1 + 2\nanswer:"
    assert format_prompt("Add.", "1 + 2", [("2 + 2", "4")]) == "Add.\ninput: 2 + 2\nanswer: 4\n\ninput: 1 + 2\nanswer:"
