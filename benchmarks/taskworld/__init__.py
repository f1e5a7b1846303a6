"""taskworld: deterministic instruction tasks with short exact-match answers, built in or brought by users.

    from benchmarks.taskworld import Task, register_task, list_tasks
    register_task(Task(name="count_fruits", family="counting", held_out=True,
                       instruction="How many fruits are in the list?", make_example=make))  # make(rng) -> (x, y)

Importing this package registers the built-in training and held-out tasks.
"""

from benchmarks.taskworld.core import (
    Task,
    TaskError,
    define_task,
    get_task,
    list_tasks,
    load_extra_tasks,
    register_task,
    unregister_task,
)
from benchmarks.taskworld.prompts import format_prompt
from benchmarks.taskworld.scoring import accuracy, balanced_accuracy, exact_match, normalize_answer
from benchmarks.taskworld.splits import SPLITS, Example, examples, split_of
from benchmarks.taskworld import bbh, tasks_heldout, tasks_reasoning, tasks_words  # noqa: F401  (registers built-ins)

__all__ = [
    "SPLITS",
    "Example",
    "Task",
    "TaskError",
    "accuracy",
    "balanced_accuracy",
    "define_task",
    "examples",
    "exact_match",
    "format_prompt",
    "get_task",
    "list_tasks",
    "load_extra_tasks",
    "normalize_answer",
    "register_task",
    "split_of",
    "unregister_task",
]
