"""Deterministic, disjoint train / fewshot / test examples of any registered task.

Each input text belongs to exactly one split, chosen by a hash of (task name, input text); each (task, split, seed)
has its own random stream, and a drawn example whose input hashes to another split is rejected. So the splits are
disjoint by input without ever materializing them, and `examples(..., n)` is a prefix of `examples(..., n + m)`.
"""

import hashlib
import random
from typing import NamedTuple

from benchmarks.taskworld.core import Task, TaskError, get_task

SPLITS = ("train", "fewshot", "test")
_SPLIT_SHARES = (0.5, 0.1, 0.4)  # train, fewshot, test: shares of the input space
MAX_ANSWER_CHARS = 40


class Example(NamedTuple):
    input: str
    answer: str


def split_of(task_name: str, input_text: str) -> str:
    """The split that owns `input_text` for this task."""
    digest = hashlib.sha256(f"{task_name}\x00{input_text}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    cumulative = 0.0
    for split, share in zip(SPLITS, _SPLIT_SHARES):
        cumulative += share
        if u < cumulative:
            return split
    return SPLITS[-1]


def _checked(task: Task, pair) -> Example:
    if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
        raise TaskError(f"task {task.name!r}: make_example must return (input_text, answer) strings, got {pair!r}")
    input_text, answer = pair
    if not input_text.strip() or not answer.strip():
        raise TaskError(f"task {task.name!r}: empty input or answer in {pair!r}")
    if len(answer) > MAX_ANSWER_CHARS:
        raise TaskError(f"task {task.name!r}: answer longer than {MAX_ANSWER_CHARS} characters: {answer!r}")
    return Example(input_text, answer)


def examples(task: Task | str, split: str, n: int, seed: int = 0, distinct: bool = True) -> list[Example]:
    """`n` examples of `task` whose inputs all belong to `split` ("train", "fewshot" or "test").

    With `distinct`, no input repeats within the returned list; a task whose split has fewer than `n` distinct
    inputs raises `TaskError`. Pretraining corpora may pass `distinct=False` to sample with repetition.
    """
    task = get_task(task) if isinstance(task, str) else task
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 0:
        raise TaskError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{task.name}|{split}|{seed}")
    out: list[Example] = []
    seen: set[str] = set()
    attempts = 0
    max_attempts = 100 * n + 1000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise TaskError(
                f"task {task.name!r}: found only {len(out)} of {n} distinct {split} inputs in {max_attempts} draws"
            )
        example = _checked(task, task.make_example(rng))
        if split_of(task.name, example.input) != split or (distinct and example.input in seen):
            continue
        seen.add(example.input)
        out.append(example)
    return out
