"""Cross-task benchmark: for each held-out task, 5 shots per seed, a fixed test set, every registered method.

    from benchmarks.cross_task import run_cross_task
    results = run_cross_task(base="tiny", tasks=["count_birds"], methods=["zero_shot", "icl"], seeds=[0, 1, 2])
    results["count_birds"]["icl"]     # {"mean", "std", "scores", "tokens", "seconds", ...}

The methods are those registered in benchmarks/harness.py (the built-in ones by benchmarks/methods.py, imported
here). The harness times each, scores it (normalized exact match), and aggregates mean +- std over seeds. The test
set is the task's first `n_test` test examples (the same for every seed; fewer where a task has fewer distinct test
inputs); seed s draws the shots `examples(task, "fewshot", shots, seed=s)`.
Outputs: a markdown table (stdout + file), JSON and a PNG plot (see `write_report`).
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

import benchmarks.methods  # noqa: F401  (registers the built-in methods)
import benchmarks.moe_methods  # noqa: F401  (sira, loramoe, multitask_lora)
import benchmarks.router_methods  # noqa: F401  (the routers: arrow, mole_shots, mole_mixture)
import benchmarks.search_methods  # noqa: F401  (issue 12's search and fit rows)
from benchmarks.harness import METHODS, Context, Method, Settings
from benchmarks.runs import RunStore, zoo_digest
from benchmarks.taskworld import Task, accuracy, balanced_accuracy, examples, get_task, list_tasks
from benchmarks.timing import run_info
from lorahub_engine._io import save_figure, write_json_atomic, write_text_atomic
from lorahub_engine.progress import progress_bar


# `bench cross-task --quick` (CI): a few held-out tasks near the zoo's skills, 2 seeds, 30 test examples.
QUICK = {"tasks": ["count_birds", "has_vehicle", "last_alphabetically", "sentiment_negated"], "seeds": 2,
         "n_test": 30, "methods": ["zero_shot", "icl", "best_single", "uniform_retrieved", "retrieval_mixture",
                                   "ties", "retrieval_lorahub", "upper_shots_lora"]}
# `bench cross-task --base smollm2 --workers 2`: sized for ~2 h of two cores. 12 of the 20 held-out tasks, one or
# two per family, shortest prompts first (none of zorbish: the zoo's zorbish adapter, rank 4, does not hold the
# 200-word vocabulary; see RESULTS.md).
PRESETS = {"smollm2": {"tasks": ["last_alphabetically", "sort_words_desc", "sentiment_negated", "are_opposites",
                                 "has_vehicle", "spell_plural", "count_birds", "count_even", "boolean_expressions",
                                 "sum_of_extremes", "review_and_topic", "navigate"],
                       "seeds": 3, "n_test": 50,
                       "methods": ["zero_shot", "icl", "best_single", "uniform_retrieved", "ties", "retrieval_mixture",
                                   "lorahub", "retrieval_lorahub", "upper_shots_lora", "arrow"]}}


def run_cross_task(base="tiny", tasks: Sequence[str] | None = None, methods: Sequence[str] | None = None,
                   seeds: Sequence[int] = (0, 1, 2, 3, 4), shots: int = 5, n_test: int = 100, *, zoo=None,
                   index=None, settings: Settings | None = None, out: str | Path | None = None,
                   progress: bool = True, runs: str | Path | None = None, workers: int = 1) -> dict:
    """Evaluate `methods` on held-out `tasks`; returns {task: {method: stats}} (stats: mean, std, scores over
    seeds, tokens per query, seconds per run, info). With `out`, writes the report files there.

    base: "tiny" / "smollm2" or a loaded `Base`; zoo: default `benchmarks.taskworld_zoo.load_zoo(base)`; index:
    default `load_zoo_index` (the zoo's shipped index, else one built over the manifest's sample prompts). runs: a
    JSON file where each finished (task, method, seed) is stored at once and found again by a rerun
    (benchmarks/runs.py). workers > 1: the tasks are shared out to that many forked processes, each with its own
    base, zoo and index (the default ones: `base` by name, no `zoo` / `index` given), torch's threads divided among
    them, each taking the next task when it finishes one; their runs meet in `runs`, from which this process then
    builds the results.
    """
    settings = settings or Settings(shots=shots, n_test=n_test)
    tasks = list(tasks or list_tasks(held_out=True))
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {sorted(METHODS)}")
    if workers > 1:
        if not isinstance(base, str) or zoo is not None or index is not None or runs is None:
            raise ValueError("workers > 1 takes the base by name, the default zoo and index, and a runs file")
        _run_in_workers(base, tasks, methods, list(seeds), settings, Path(runs), workers, progress)
    base = _base(base)
    if zoo is None:
        from benchmarks.taskworld_zoo import load_zoo

        zoo = load_zoo(base, progress=progress)
    if index is None:
        from benchmarks.taskworld_zoo import load_zoo_index

        index = load_zoo_index(base.name, zoo)
    store = None if runs is None else RunStore(runs, runs_key(base.name, settings, seeds, zoo))
    cache: dict = {}
    results: dict = {}
    bar = progress_bar(total=len(tasks) * len(methods), desc="cross-task", unit="run", progress=progress)
    for name in tasks:
        task = get_task(name)
        test = test_set(task, settings.n_test)
        results[name] = {}
        for method_name in methods:
            bar.set_postfix(task=name, method=method_name)
            results[name][method_name] = _evaluate(METHODS[method_name], base, zoo, index, task, test, list(seeds),
                                                   settings, cache, store)
            bar.update()
    bar.close()
    if out is not None:
        write_report(results, Path(out), base.name, settings, list(seeds))
    return results


def runs_key(base_name: str, settings: Settings, seeds: Sequence[int], zoo) -> dict:
    """What a runs file's runs depend on besides (task, method, seed): the base, the settings, the seeds, the zoo."""
    return {"base": base_name, "settings": asdict(settings), "seeds": list(seeds), "zoo": zoo.names,
            "zoo_digest": zoo_digest(zoo)}


def _run_in_workers(base_name: str, tasks: list[str], methods: list[str], seeds: list[int], settings: Settings,
                    runs: Path, workers: int, progress: bool) -> None:
    """Every task's runs into `runs`, by `workers` forked processes (each loads the base once; forked, they see every
    task and method registered here)."""
    threads = max(1, torch.get_num_threads() // workers)
    jobs = [(task, methods, seeds, settings, runs) for task in tasks]
    context = multiprocessing.get_context("fork")
    with context.Pool(min(workers, len(tasks)), _start_worker, (base_name, threads)) as pool:
        done = pool.imap_unordered(_worker_task, jobs)
        for _ in progress_bar(done, total=len(jobs), desc=f"cross-task, {workers} workers", unit="task",
                              progress=progress):
            pass


_worker: tuple = ()  # (base, zoo, index) of a worker process


def _start_worker(base_name: str, threads: int) -> None:
    global _worker
    from benchmarks.taskworld_zoo import load_zoo, load_zoo_index

    torch.set_num_threads(threads)
    base = _base(base_name)
    zoo = load_zoo(base, progress=False)
    _worker = (base, zoo, load_zoo_index(base.name, zoo))


def _worker_task(job: tuple) -> str:
    task, methods, seeds, settings, runs = job
    base, zoo, index = _worker
    run_cross_task(base, [task], methods, seeds, zoo=zoo, index=index, settings=settings, runs=runs, progress=False)
    return task


def test_set(task: Task, n: int) -> list[tuple[str, str]]:
    """The task's first n distinct test examples (fewer if its test split has fewer inputs, e.g. spell_plural)."""
    first: dict[str, str] = {}
    for x, y in examples(task, "test", 4 * n, seed=0, distinct=False):
        first.setdefault(x, y)  # input -> answer, in order of first appearance
    return list(first.items())[:n]


def _evaluate(method: Method, base, zoo, index, task: Task, test, seeds: list[int], settings: Settings,
              cache: dict, store: RunStore | None = None) -> dict:
    runs = []
    for seed in seeds if method.uses_shots else seeds[:1]:
        run = store.get(task.name, method.name, seed) if store else None
        if run is None:
            run = _run_once(method, Context(base, zoo, index, task, [], test, seed, seeds, settings, cache))
            if store:
                store.put(task.name, method.name, seed, run)
        runs.append(run)
    copies = 1 if method.uses_shots else len(seeds)
    scores = [r["score"] for r in runs] * copies
    balanced = [r.get("balanced") for r in runs] * copies  # runs stored before it was recorded have none
    return {"mean": statistics.fmean(scores), "std": statistics.pstdev(scores), "scores": scores,
            "balanced": None if None in balanced else statistics.fmean(balanced), "n_test": len(test),
            "tokens": statistics.fmean(r["tokens"] for r in runs),
            "seconds": statistics.fmean(r["seconds"] for r in runs), "per_seed": method.uses_shots,
            "span": _span(runs), "info": [r["info"] for r in runs], "first_predictions": runs[0]["first_predictions"]}


def _span(runs: list[dict]) -> list[float] | None:
    """[first start, last finish] (Unix seconds) of these runs; None for runs stored without their finish time."""
    if not all("finished" in r for r in runs):
        return None
    return [min(r["finished"] - r["seconds"] for r in runs), max(r["finished"] for r in runs)]


def wall_span(results: dict) -> float | None:
    """Seconds from the first run's start to the last run's finish, over every (task, method): the benchmark's wall
    time, pauses between resumes included; None when some runs were stored without their finish time."""
    spans = [stats.get("span") for row in results.values() for stats in row.values()]
    if not spans or None in spans:
        return None
    return max(s[1] for s in spans) - min(s[0] for s in spans)


def _run_once(method: Method, ctx: Context) -> dict:
    """One (task, method, seed): score, balanced accuracy (None beyond MAX_CLASSES answers), prompt tokens per query,
    wall seconds, the method's info, 3 answers."""
    ctx.shots = ctx.shots_of(ctx.seed)
    start = time.perf_counter()
    with torch.no_grad():
        output = method.run(ctx)
    seconds = time.perf_counter() - start
    if len(output.predictions) != len(ctx.test):
        raise ValueError(f"method {method.name} returned {len(output.predictions)} predictions for {len(ctx.test)}")
    answers = [y for _, y in ctx.test]
    return {"score": accuracy(output.predictions, answers), "balanced": balanced_accuracy(output.predictions, answers),
            "tokens": output.prompt_tokens, "seconds": seconds, "finished": time.time(), "info": output.info,
            "first_predictions": output.predictions[:3]}


def _base(base):
    if isinstance(base, str):
        from benchmarks.bases import load_base

        return load_base(base)
    return base


# ---- report --------------------------------------------------------------------------------------------------
def summary(results: dict) -> dict:
    """Per method: mean over tasks, std over seeds of the per-seed task mean, tokens and seconds per run."""
    methods = list(next(iter(results.values())))
    out = {}
    for m in methods:
        per_task = [results[t][m] for t in results]
        per_seed = [statistics.fmean(s) for s in zip(*(r["scores"] for r in per_task))]
        out[m] = {"mean": statistics.fmean(r["mean"] for r in per_task), "std": statistics.pstdev(per_seed),
                  "tokens": statistics.fmean(r["tokens"] for r in per_task),
                  "seconds": statistics.fmean(r["seconds"] for r in per_task)}
    return out


def markdown_table(results: dict) -> str:
    """Rows: tasks, then the mean, prompt tokens per query and wall seconds per run; columns: methods."""
    methods = list(next(iter(results.values())))
    total = summary(results)
    lines = ["| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for task, row in results.items():
        cells = (f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}" for m in methods)
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{total[m]['mean']:.3f}** ± {total[m]['std']:.3f}" for m in methods)
                 + " |")
    lines.append("| prompt tokens / query | " + " | ".join(f"{total[m]['tokens']:.0f}" for m in methods) + " |")
    lines.append("| wall s / run | " + " | ".join(f"{total[m]['seconds']:.1f}" for m in methods) + " |")
    return "\n".join(lines)


def balanced_table(results: dict) -> str | None:
    """Balanced accuracy (mean over seeds) of the tasks whose answers are classes, with their mean; None if none
    are (or runs were stored before it was recorded)."""
    methods = list(next(iter(results.values())))
    tasks = [t for t, row in results.items() if all(row[m].get("balanced") is not None for m in methods)]
    if not tasks:
        return None
    lines = ["| task (balanced accuracy) | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    lines += [f"| {t} | " + " | ".join(f"{results[t][m]['balanced']:.3f}" for m in methods) + " |" for t in tasks]
    means = [statistics.fmean(results[t][m]["balanced"] for t in tasks) for m in methods]
    lines.append("| **mean** | " + " | ".join(f"**{v:.3f}**" for v in means) + " |")
    return "\n".join(lines)


def write_report(results: dict, out: Path, base_name: str, settings: Settings, seeds: list[int],
                 stem: str | None = None) -> dict[str, Path]:
    """Write <stem>.md, <stem>.json and <stem>.png into `out`; print the table. Returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"cross_task_{base_name}"
    paths = {ext: out / f"{stem}.{ext}" for ext in ("md", "json", "png")}
    table = "\n\n".join(t for t in (markdown_table(results), balanced_table(results)) if t is not None)
    span = wall_span(results)
    print(table)
    if span is not None:
        print(f"wall time, first run's start to last run's finish: {span / 3600:.2f} h ({span / 60:.0f} min)")
    write_text_atomic(paths["md"], table + "\n")
    record = {"env": run_info(), "base": base_name, "settings": asdict(settings), "seeds": seeds,
              "methods": {m: METHODS[m].description for m in next(iter(results.values()))},
              "summary": summary(results), "wall_span_seconds": span, "results": results}
    write_json_atomic(paths["json"], record)
    plot(results, paths["png"], title=f"cross-task, {base_name} base, {len(results)} held-out tasks")
    return paths


def plot(results: dict, path: Path, title: str) -> None:
    """Bar per method: mean accuracy over tasks, error bar = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = summary(results)
    names = list(total)
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names) + 2), 4))
    ax.bar(names, [total[m]["mean"] for m in names], yerr=[total[m]["std"] for m in names], capsize=3)
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)

