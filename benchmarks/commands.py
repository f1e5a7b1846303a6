"""`lorahub-engine build-zoo` and `bench cross-task`: the benchmarks package's commands (entry-point plugins).

`demo` declares itself in benchmarks/demo.py, next to the demo it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorahub_engine.cli.options import add_threads, positive_int, set_threads, show_progress


def add_build_zoo(commands) -> None:
    p = commands.add_parser("build-zoo", help="train one LoRA per taskworld training task (resumable, cached)",
                            description="Train the benchmark zoo through the engine (all adapters of a group "
                                        "jointly); cached in $LORAHUB_CACHE, resumable by group.")
    add_taskworld_options(p, base_help="base model the adapters train on")
    p.add_argument("--out", help="also write the finished zoo to this folder (e.g. benchmarks/assets/tiny_zoo) and "
                                 "its retrieval index beside it (OUT_index)")
    p.set_defaults(run=run_build_zoo)


def add_taskworld_options(p: argparse.ArgumentParser, base_help: str) -> None:
    """--base, --extra-tasks and --threads: what every taskworld command reads before it starts."""
    p.add_argument("--base", default="tiny", choices=("tiny", "smollm2"), help=base_help)
    p.add_argument("--extra-tasks", action="append", default=[], help="module that registers more tasks")
    add_threads(p)


def apply_taskworld_options(args: argparse.Namespace) -> None:
    """Torch threads as asked, and the extra tasks registered."""
    from benchmarks.taskworld import load_extra_tasks

    set_threads(args)
    for module in args.extra_tasks:
        load_extra_tasks(module)


def run_build_zoo(args: argparse.Namespace) -> int:
    from benchmarks.bases import load_base
    import lorahub_engine as le
    from benchmarks.taskworld_zoo import build_zoo
    from retrieval import AdapterIndex

    apply_taskworld_options(args)
    folder = build_zoo(load_base(args.base), out=args.out, progress=show_progress())
    print(f"zoo: {folder}")
    if args.out:
        index = Path(args.out).with_name(Path(args.out).name + "_index")
        AdapterIndex.build(le.AdapterZoo.load(folder, lazy=True)).save(index)
        print(f"retrieval index: {index}")
    return 0


def add_bench(commands) -> None:
    p = commands.add_parser("bench", help="benchmarks (cross-task: held-out tasks x composition methods)",
                            description="Run a benchmark; writes markdown, JSON and PNG results.")
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    cross = sub.add_parser("cross-task", help="held-out tasks x methods, 5 shots, mean +- std over seeds")
    add_taskworld_options(cross, base_help="base model")
    cross.add_argument("--quick", action="store_true", help="a few tasks, 2 seeds, 30 test examples (CI)")
    cross.add_argument("--methods", nargs="+", help="registered method names (default: all)")
    cross.add_argument("--tasks", nargs="+", help="held-out task names (default: all held-out tasks)")
    cross.add_argument("--seeds", type=positive_int, help="number of seeds (0..n-1; default 5, smollm2 3)")
    cross.add_argument("--shots", type=positive_int, default=5, help="examples of the task per seed")
    cross.add_argument("--n-test", type=positive_int, help="test examples per task (default 100, smollm2 50)")
    cross.add_argument("--resume", action="store_true",
                       help="reuse the finished (task, method, seed) runs of an interrupted run with the same settings")
    cross.add_argument("--k", type=positive_int, default=3, help="adapters retrieved")
    cross.add_argument("--workers", type=positive_int, default=1,
                       help="processes sharing the tasks (each loads the base; --threads divided among them, "
                            "at least 1 each)")
    cross.add_argument("--out", default="benchmarks/results", help="folder for the .md / .json / .png")
    cross.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from benchmarks import cross_task
    from benchmarks.bases import load_base
    from benchmarks.harness import METHODS
    from benchmarks.taskworld import get_task
    from benchmarks.taskworld_zoo import require_zoo

    apply_taskworld_options(args)
    unknown = [m for m in args.methods or () if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {', '.join(sorted(METHODS))}")
    for task in args.tasks or ():
        if not get_task(task).held_out:
            raise ValueError(f"{task} is a training task; the benchmark takes held-out tasks")
    require_zoo(args.base)
    preset = cross_task.QUICK if args.quick else cross_task.PRESETS.get(args.base, {})
    settings = cross_task.Settings(shots=args.shots, n_test=args.n_test or preset.get("n_test", 100), k=args.k)
    seeds = list(range(args.seeds or preset.get("seeds", 5)))
    tasks = args.tasks or preset.get("tasks")
    methods = args.methods or preset.get("methods")
    stem = f"cross_task_{args.base}" + ("_quick" if args.quick else "")
    runs = Path(args.out) / f"{stem}.runs.json"  # every finished (task, method, seed), for --resume
    if not args.resume:
        runs.unlink(missing_ok=True)
    base = args.base if args.workers > 1 else load_base(args.base)  # workers load their own
    results = cross_task.run_cross_task(base, tasks, methods, seeds, settings=settings, runs=runs,
                                        progress=show_progress(), workers=args.workers)
    paths = cross_task.write_report(results, Path(args.out), args.base, settings, seeds, stem)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
