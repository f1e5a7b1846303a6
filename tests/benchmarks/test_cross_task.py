"""Cross-task harness: scoring and aggregation against hand-made methods, report files, built-in methods."""

import copy
import json
import multiprocessing
import os

import pytest

import lorahub_engine as le
from benchmarks import cross_task, taskworld_zoo
from benchmarks.cross_task import markdown_table, run_cross_task
from benchmarks.harness import METHODS, Context, MethodOutput, Settings, register_method
from benchmarks.runs import RunStore
from benchmarks.taskworld import get_task
from benchmarks.training import mean_losses
from tests.benchmarks.micro import FakeIndex

TASKS = ["count_birds", "spell_plural"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fake_methods():
    """Methods with known answers: oracle (all right), seed0 (right only on seed 0), half (static, half right)."""

    @register_method("test_oracle")
    def oracle(ctx: Context) -> MethodOutput:
        return MethodOutput([y for _, y in ctx.test], 7.0, {"seed": ctx.seed})

    @register_method("test_seed0")
    def seed0(ctx: Context) -> MethodOutput:
        return MethodOutput([y if ctx.seed == 0 else "#" for _, y in ctx.test], 3.0)

    @register_method("test_half", uses_shots=False)
    def half(ctx: Context) -> MethodOutput:
        return MethodOutput([y if i % 2 == 0 else "#" for i, (_, y) in enumerate(ctx.test)], 1.0)

    yield ["test_oracle", "test_seed0", "test_half"]
    for name in ("test_oracle", "test_seed0", "test_half"):
        METHODS.pop(name)


def test_scores_and_aggregates_over_seeds(micro_zoo, fake_methods):
    base, zoo = micro_zoo
    results = run_cross_task(base, TASKS, fake_methods, seeds=[0, 1], n_test=4, zoo=zoo, index=FakeIndex(),
                             progress=False)
    for task in TASKS:
        oracle, seed0, half = (results[task][m] for m in fake_methods)
        assert oracle["scores"] == [1.0, 1.0] and oracle["mean"] == 1.0 and oracle["std"] == 0.0
        assert oracle["tokens"] == 7.0 and [i["seed"] for i in oracle["info"]] == [0, 1]
        assert seed0["scores"] == [1.0, 0.0] and seed0["mean"] == 0.5 and seed0["std"] == pytest.approx(0.5)
        assert half["scores"] == [0.5, 0.5] and len(half["info"]) == 1  # run once, counted for both seeds
        assert oracle["balanced"] == 1.0 and seed0["balanced"] == 0.5  # counts are classes (<= 8 answers)
    summary = cross_task.summary(results)
    assert summary["test_seed0"]["mean"] == 0.5 and summary["test_seed0"]["std"] == pytest.approx(0.5)


def test_report_files_table_and_json_round_trip(micro_zoo, fake_methods, tmp_path, capsys):
    base, zoo = micro_zoo
    methods = ["zero_shot", "icl", *fake_methods]
    results = run_cross_task(base, TASKS, methods, seeds=[0, 1], n_test=4, zoo=zoo, index=FakeIndex(),
                             out=tmp_path, progress=False)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"cross_task_tiny.md", "cross_task_tiny.json", "cross_task_tiny.png"} <= files
    table = (tmp_path / "cross_task_tiny.md").read_text()
    assert table.strip() in capsys.readouterr().out
    header = table.splitlines()[0]
    assert all(f" {m} " in header for m in methods) and all(f"| {t} |" in table for t in TASKS)
    record = json.loads((tmp_path / "cross_task_tiny.json").read_text())
    assert record["results"] == json.loads(json.dumps(results)) and record["seeds"] == [0, 1]
    for task in TASKS:
        for m in methods:
            stats = results[task][m]
            assert 0 <= stats["mean"] <= 1 and all(0 <= s <= 1 for s in stats["scores"]) and stats["tokens"] > 0
    assert results[TASKS[0]]["icl"]["tokens"] > results[TASKS[0]]["zero_shot"]["tokens"]  # the shots are read
    assert (tmp_path / "cross_task_tiny.png").read_bytes()[:4] == b"\x89PNG"


def test_builtin_adapter_methods_run_and_leave_the_base_clean(micro_zoo):
    base, zoo = micro_zoo
    methods = [m for m in METHODS if m != "upper_task_lora" and not m.startswith("test_")]
    results = run_cross_task(base, ["count_birds"], methods, seeds=[0], n_test=3, zoo=zoo, index=FakeIndex(),
                             settings=Settings(n_test=3, k=2, max_new_tokens=4), progress=False)
    assert set(results["count_birds"]) == set(methods)
    assert results["count_birds"]["uniform_retrieved"]["info"][0]["adapters"] == ["count_animal", "has_animal"]
    with pytest.raises(le.AdapterError):
        le.attached_names(base.model)  # every method detached what it attached


def test_best_single_picks_the_lowest_shot_loss(micro_zoo):
    base, zoo = micro_zoo
    results = run_cross_task(base, ["count_birds"], ["best_single"], seeds=[0], n_test=2, zoo=zoo,
                             index=FakeIndex(), settings=Settings(n_test=2, max_new_tokens=2), progress=False)
    ctx = Context(base, zoo, FakeIndex(), get_task("count_birds"), [], [], 0, [0], Settings())
    pairs = ctx.shot_pairs(ctx.shots_of(0))
    losses = {a.name: mean_losses(base, [a], pairs)[0] for a in zoo}  # one adapter at a time
    assert results["count_birds"]["best_single"]["info"][0]["adapters"] == [min(losses, key=losses.get)]


def test_unknown_method_and_duplicate_registration_are_errors(micro_zoo):
    base, zoo = micro_zoo
    with pytest.raises(ValueError, match="unknown methods"):
        run_cross_task(base, TASKS, ["nope"], seeds=[0], n_test=2, zoo=zoo, index=FakeIndex(), progress=False)
    with pytest.raises(ValueError, match="already registered"):
        register_method("zero_shot")(lambda ctx: None)


def test_markdown_table_layout():
    stats = {"mean": 0.5, "std": 0.1, "scores": [0.4, 0.6], "tokens": 12.0, "seconds": 1.5}
    table = markdown_table({"t1": {"a": stats, "b": stats}, "t2": {"a": stats, "b": stats}})
    lines = table.splitlines()
    assert lines[0] == "| task | a | b |" and lines[2] == "| t1 | 0.500 ± 0.100 | 0.500 ± 0.100 |"
    assert lines[-2] == "| prompt tokens / query | 12 | 12 |" and lines[-1] == "| wall s / run | 1.5 | 1.5 |"


def test_balanced_table_covers_the_tasks_whose_answers_are_classes():
    def stats(balanced):
        return {"mean": 0.5, "std": 0.0, "scores": [0.5], "tokens": 1.0, "seconds": 1.0, "balanced": balanced}

    results = {"t1": {"a": stats(0.5), "b": stats(0.75)}, "t2": {"a": stats(None), "b": stats(0.5)},
               "t3": {"a": stats(0.25), "b": stats(1.0)}}
    lines = cross_task.balanced_table(results).splitlines()
    assert lines[2:] == ["| t1 | 0.500 | 0.750 |", "| t3 | 0.250 | 1.000 |", "| **mean** | **0.375** | **0.875** |"]
    assert cross_task.balanced_table({"t2": results["t2"]}) is None


def test_a_stopped_run_resumes_from_its_stored_runs(micro_zoo, fake_methods, tmp_path):
    """Every finished (task, method, seed) is stored at once; a rerun reuses them and runs only what is missing."""
    base, zoo = micro_zoo
    runs = tmp_path / "runs.json"
    calls = []

    @register_method("test_counted")
    def counted(ctx: Context) -> MethodOutput:
        calls.append((ctx.task.name, ctx.seed))
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped during its third run
        return MethodOutput([y for _, y in ctx.test], 2.0)

    try:
        with pytest.raises(KeyboardInterrupt):
            run_cross_task(base, TASKS, ["test_counted"], seeds=[0, 1], n_test=4, zoo=zoo, index=FakeIndex(),
                           progress=False, runs=runs)
        stored = json.loads(runs.read_text())["runs"]
        assert sorted(stored) == [f"{TASKS[0]}|test_counted|0", f"{TASKS[0]}|test_counted|1"]
        results = run_cross_task(base, TASKS, ["test_counted"], seeds=[0, 1], n_test=4, zoo=zoo, index=FakeIndex(),
                                 progress=False, runs=runs)
        assert calls == [(TASKS[0], 0), (TASKS[0], 1), (TASKS[1], 0), (TASKS[1], 0), (TASKS[1], 1)]
        assert all(results[t]["test_counted"]["scores"] == [1.0, 1.0] for t in TASKS)
        with pytest.raises(ValueError, match="another setting"):  # other settings never mix with these runs
            run_cross_task(base, TASKS, ["test_counted"], seeds=[0, 1], n_test=3, zoo=zoo, index=FakeIndex(),
                           progress=False, runs=runs)
        rebuilt = copy.deepcopy(zoo)  # the same names, one factor changed: a rebuilt zoo
        next(iter(next(iter(rebuilt)).modules.values())).B.add_(1e-3)
        with pytest.raises(ValueError, match="another setting"):
            run_cross_task(base, TASKS, ["test_counted"], seeds=[0, 1], n_test=4, zoo=rebuilt, index=FakeIndex(),
                           progress=False, runs=runs)
    finally:
        METHODS.pop("test_counted")


def test_run_stores_of_several_processes_keep_every_run(tmp_path):
    """Processes sharing a runs file each add their runs; none drops another's (an unlocked read-modify-write
    would: every writer rewrites the whole file from what it read)."""
    path, key = tmp_path / "runs.json", {"base": "x"}
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_put_runs, args=(path, key, f"task{w}", 25)) for w in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert [w.exitcode for w in writers] == [0, 0, 0]
    stored = RunStore(path, key).runs
    assert sorted(stored) == sorted(f"task{w}|m|{s}" for w in range(3) for s in range(25))


def _put_runs(path, key, task: str, n: int) -> None:
    store = RunStore(path, key)
    for seed in range(n):
        store.put(task, "m", seed, {"score": 1.0})


def test_workers_share_the_tasks_and_give_the_results_of_one_process(micro_zoo, fake_methods, tmp_path,
                                                                     monkeypatch):
    """workers=2: two forked processes run the tasks (each its own base, zoo, index: the defaults of the base
    named), their runs meet in the runs file, and the results equal one process's; the span covers every run."""
    base, zoo = micro_zoo
    monkeypatch.setattr(cross_task, "_base", lambda name: base)  # "micro" or the loaded base
    monkeypatch.setattr(taskworld_zoo, "load_zoo", lambda b, progress=True: zoo)
    monkeypatch.setattr(taskworld_zoo, "load_zoo_index", lambda name, z: FakeIndex())
    pids = []

    @register_method("test_pid")
    def pid(ctx: Context) -> MethodOutput:
        pids.append(os.getpid())  # the parent's list: stays empty when the runs happen in workers
        return MethodOutput([y for _, y in ctx.test], 1.0, {"pid": os.getpid()})

    try:
        methods = [*fake_methods, "test_pid"]
        kwargs = dict(seeds=[0, 1], settings=Settings(n_test=4), progress=False)
        parallel = run_cross_task("micro", TASKS, methods, runs=tmp_path / "a.json", workers=2, **kwargs)
        assert pids == []
        workers = {info["pid"] for t in TASKS for info in parallel[t]["test_pid"]["info"]}
        assert len(workers) == 2 and os.getpid() not in workers
        single = run_cross_task("micro", TASKS, methods, runs=tmp_path / "b.json", **kwargs)
        assert pids  # this time in this process
        for t in TASKS:
            for m in fake_methods:
                assert parallel[t][m]["scores"] == single[t][m]["scores"]
        first = min(s["span"][0] for row in parallel.values() for s in row.values())
        last = max(s["span"][1] for row in parallel.values() for s in row.values())
        assert cross_task.wall_span(parallel) == pytest.approx(last - first) and last > first
        with pytest.raises(ValueError, match="by name"):
            run_cross_task(base, TASKS, methods, runs=tmp_path / "c.json", workers=2, **kwargs)
    finally:
        METHODS.pop("test_pid")
