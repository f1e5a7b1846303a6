"""`lorahub-engine build-zoo` and `bench cross-task`: the benchmarks package's commands (entry-point plugins).

`demo` declares itself in benchmarks/demo.py, next to the demo it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorahub_engine.cli.options import add_threads, set_threads


def add_build_zoo(commands) -> None:
    p = commands.add_parser("build-zoo", help="train one LoRA per taskworld training task (resumable, cached)",
                            description="Train the benchmark zoo through the engine (all adapters of a group "
                                        "jointly); cached in $LORAHUB_CACHE, resumable by group.")
    p.add_argument("--base", default="tiny", choices=("tiny", "smollm2"))
    p.add_argument("--out", help="also write the finished zoo to this folder (e.g. benchmarks/assets/tiny_zoo)")
    p.add_argument("--extra-tasks", action="append", default=[], help="module that registers more tasks")
    add_threads(p)
    p.set_defaults(run=run_build_zoo)


def run_build_zoo(args: argparse.Namespace) -> int:
    from benchmarks.bases import load_base
    from benchmarks.taskworld import load_extra_tasks
    from benchmarks.zoo import build_zoo

    set_threads(args)
    for module in args.extra_tasks:
        load_extra_tasks(module)
    folder = build_zoo(load_base(args.base), out=args.out)
    print(f"zoo: {folder}")
    return 0


def add_bench(commands) -> None:
    p = commands.add_parser("bench", help="benchmarks (cross-task: held-out tasks x composition methods)",
                            description="Run a benchmark; writes markdown, JSON and PNG results.")
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    cross = sub.add_parser("cross-task", help="held-out tasks x methods, 5 shots, mean +- std over seeds")
    cross.add_argument("--base", default="tiny", choices=("tiny", "smollm2"))
    cross.add_argument("--quick", action="store_true", help="a few tasks, 2 seeds, 30 test examples (CI)")
    cross.add_argument("--methods", nargs="+", help="registered method names (default: all)")
    cross.add_argument("--tasks", nargs="+", help="held-out task names (default: all held-out tasks)")
    cross.add_argument("--seeds", type=int, default=5, help="number of seeds (0..n-1)")
    cross.add_argument("--shots", type=int, default=5)
    cross.add_argument("--n-test", type=int, default=100)
    cross.add_argument("--k", type=int, default=3, help="adapters retrieved")
    cross.add_argument("--out", default="benchmarks/results", help="folder for the .md / .json / .png")
    cross.add_argument("--extra-tasks", action="append", default=[], help="module that registers more tasks")
    add_threads(cross)
    cross.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from benchmarks import cross_task
    from benchmarks.bases import load_base
    from benchmarks.taskworld import load_extra_tasks

    set_threads(args)
    for module in args.extra_tasks:
        load_extra_tasks(module)
    quick = cross_task.QUICK if args.quick else {}
    settings = cross_task.Settings(shots=args.shots, n_test=quick.get("n_test", args.n_test), k=args.k)
    seeds = list(range(quick.get("seeds", args.seeds)))
    tasks = args.tasks or quick.get("tasks")
    methods = args.methods or quick.get("methods")
    base = load_base(args.base)
    results = cross_task.run_cross_task(base, tasks, methods, seeds, settings=settings)
    stem = f"cross_task_{args.base}" + ("_quick" if args.quick else "")
    paths = cross_task.write_report(results, Path(args.out), args.base, settings, seeds, stem)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
