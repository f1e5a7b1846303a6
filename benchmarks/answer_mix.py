"""What a task's zero-shot score is made of, and what its few shots can tell of it: the test set's answer mix, the
base's answer mix on it, and per seed the shots' answers and how many of them the base answers right.

    HF_HUB_OFFLINE=1 python -m benchmarks.answer_mix --tasks are_opposites web_of_lies [--base tiny] [--seeds 5]

A base that answers one class for every input scores that class's share of the test set (its majority-class rate);
leave-one-out over five shots then sees the base right on as many shots as carry that class, which swings with the
seed far more than the test score does. Generation as the cross-task benchmark's zero_shot row (same prompts, greedy,
`Settings().max_new_tokens`).
"""

from __future__ import annotations

import argparse
from collections import Counter

from benchmarks.bases import load_base
from benchmarks.cross_task import test_set
from benchmarks.harness import Settings
from benchmarks.taskworld import get_task
from benchmarks.taskworld.splits import examples
from lorahub_engine.fewshot import exact_match, generate_answers, normalize_answer


def _mix(answers: list[str], top: int = 3) -> str:
    """The `top` most frequent normalized answers with their shares, e.g. "no 0.66, yes 0.34"."""
    counts = Counter(normalize_answer(a) for a in answers)
    return ", ".join(f"{a or '(empty)'} {n / len(answers):.2f}" for a, n in counts.most_common(top))


def task_mix(base, task_name: str, seeds: int, settings: Settings) -> dict:
    """The test set's and the base's answer mix, the base's score, and per seed (shots' answers, base right)."""
    task = get_task(task_name)

    def answer(pairs):
        prompts = [base.prompt(task.instruction, x, ()) for x, _ in pairs]
        predictions = generate_answers(base.model, base.tokenizer, prompts, max_new_tokens=settings.max_new_tokens)
        return predictions, sum(exact_match(p, y) for p, (_, y) in zip(predictions, pairs))

    test = test_set(task, settings.n_test)
    predictions, right = answer(test)
    shots = []
    for seed in range(seeds):
        pairs = examples(task, "fewshot", settings.shots, seed=seed)
        shots.append({"seed": seed, "answers": [y for _, y in pairs], "base_right": answer(pairs)[1]})
    return {"task": task_name, "gold": _mix([y for _, y in test]), "base": _mix(predictions),
            "zero_shot": right / len(test), "shots": shots}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument("--base", default="tiny")
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args(argv)
    base, settings = load_base(args.base), Settings()
    print("| task | test answers | base's answers | zero-shot | per seed: base right on the shots (shots' answers) |")
    print("|---|---|---|---|---|")
    for name in args.tasks:
        row = task_mix(base, name, args.seeds, settings)
        per_seed = "; ".join(f"{s['base_right']}/{len(s['answers'])} ({' '.join(s['answers'])})" for s in row["shots"])
        print(f"| {name} | {row['gold']} | {row['base']} | {row['zero_shot']:.2f} | {per_seed} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
