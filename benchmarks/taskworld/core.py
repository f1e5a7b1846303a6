"""Tasks as data: the `Task` record and the one registry that built-in and user tasks share."""

import difflib
import importlib
import random
from dataclasses import dataclass
from typing import Callable


class TaskError(ValueError):
    """A task is malformed, unknown, registered twice, or cannot give the examples asked for."""


@dataclass(frozen=True)
class Task:
    """One task: an English instruction and a generator of (input_text, answer) pairs.

    `make_example(rng)` takes a `random.Random` and returns a pair of strings; the answer is short (a word, a
    number, a few tokens) and scored by normalized exact match. `held_out` tasks are never seen by a zoo adapter
    or by the tiny base's pretraining.
    """

    name: str
    family: str
    held_out: bool
    instruction: str
    make_example: Callable[[random.Random], tuple[str, str]]
    description: str = ""

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").isalnum():
            raise TaskError(f"task name must be non-empty letters, digits and '_', got {self.name!r}")
        if not self.family or not self.instruction.strip():
            raise TaskError(f"task {self.name!r} needs a family and a non-empty instruction")
        if not callable(self.make_example):
            raise TaskError(f"task {self.name!r}: make_example must be callable, got {type(self.make_example)}")


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add `task` to the registry; a second task under the same name is an error."""
    if not isinstance(task, Task):
        raise TaskError(f"register_task expects a Task, got {type(task).__name__}")
    if task.name in _REGISTRY:
        raise TaskError(f"a task named {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def define_task(name: str, family: str, instruction: str, held_out: bool = False):
    """Decorator form of `register_task`: the decorated `make_example(rng)` becomes the task's generator."""

    def register(make_example: Callable[[random.Random], tuple[str, str]]):
        register_task(Task(name, family, held_out, instruction, make_example, (make_example.__doc__ or "").strip()))
        return make_example

    return register


def unregister_task(name: str) -> Task:
    """Remove and return the task called `name` (to replace it, or to undo a registration)."""
    task = get_task(name)
    del _REGISTRY[name]
    return task


def get_task(name: str) -> Task:
    """The registered task called `name`; unknown names raise `TaskError` with the closest matches."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise TaskError(f"unknown task {name!r}{hint}")
    return _REGISTRY[name]


def list_tasks(held_out: bool | None = None, family: str | None = None) -> list[str]:
    """Sorted names of registered tasks, optionally only held-out (True) / training (False) ones of a family."""
    return sorted(
        name for name, task in _REGISTRY.items()
        if (held_out is None or task.held_out == held_out) and (family is None or task.family == family)
    )


def load_extra_tasks(module: str) -> list[str]:
    """Import `module` (dotted name), which registers its tasks; return the names it added."""
    before = set(_REGISTRY)
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise TaskError(f"cannot import task module {module!r}: {err}") from err
    return sorted(set(_REGISTRY) - before)
