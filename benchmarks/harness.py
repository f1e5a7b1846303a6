"""The cross-task harness's vocabulary: the method registry, the settings and the context a method sees.

A method is a function registered by name (`@register_method("zero_shot")`) that takes a `Context` and returns a
`MethodOutput` (one prediction per test input, prompt tokens per query). The built-in methods live in
benchmarks/methods.py and register here; benchmarks/cross_task.py runs and reports them. A method registered with
`uses_shots=False` runs once per task and counts for every seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from benchmarks.taskworld import Task, examples, format_prompt


class MethodOutput(NamedTuple):
    predictions: list[str]  # one answer per test input, in order
    prompt_tokens: float  # mean prompt tokens the model reads per test query
    info: dict = {}  # anything worth recording (adapters chosen, ...), JSON-serializable


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[["Context"], MethodOutput]
    uses_shots: bool = True  # False: independent of the seed's shots, run once per task
    description: str = ""


METHODS: dict[str, Method] = {}


def register_method(name: str, uses_shots: bool = True):
    """Decorator: register `fn(ctx) -> MethodOutput` under `name` (its docstring's first line describes it)."""

    def register(fn: Callable[[Context], MethodOutput]):
        if name in METHODS:
            raise ValueError(f"a method named {name!r} is already registered")
        METHODS[name] = Method(name, fn, uses_shots, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
        return fn

    return register


@dataclass(frozen=True)
class Settings:
    """Knobs shared by the methods (kept in the JSON output)."""

    shots: int = 5
    n_test: int = 100
    k: int = 3  # adapters retrieved per input / per task
    batch_size: int = 50  # rows per generation batch
    max_new_tokens: int = 24


@dataclass
class Context:
    """What a method sees for one (task, seed). `cache` is shared by all calls of one run (memoize there)."""

    base: object  # benchmarks.bases.Base
    zoo: object  # lorahub_engine.AdapterZoo
    index: object  # anything with search(texts, k)
    task: Task
    shots: list[tuple[str, str]]  # (input, answer) of this seed
    test: list[tuple[str, str]]  # (input, answer), the same for every seed
    seed: int
    seeds: list[int]
    settings: Settings
    cache: dict = field(default_factory=dict)

    def query(self, input_text: str, shots: Sequence[tuple[str, str]] = ()) -> str:
        """The plain-text prompt (instruction + shots + input): what retrieval embeds."""
        return format_prompt(self.task.instruction, input_text, shots)

    def prompt(self, input_text: str, shots: Sequence[tuple[str, str]] = ()) -> str:
        """The prompt as the base reads it (chat bases: chat template, each shot a user/assistant turn pair)."""
        return self.base.prompt(self.task.instruction, input_text, shots)

    def shots_of(self, seed: int) -> list[tuple[str, str]]:
        return [tuple(e) for e in examples(self.task, "fewshot", self.settings.shots, seed=seed)]

    def shot_pairs(self, shots: Sequence[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
        """(prompt, answer) training pairs of the shots (default: this seed's)."""
        return [(self.prompt(x), y) for x, y in (self.shots if shots is None else shots)]
