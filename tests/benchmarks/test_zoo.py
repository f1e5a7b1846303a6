"""Zoo builder: joint training equals separate runs, trained adapters lower the loss, manifest, resume, cache."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

import lorahub_engine as le
from benchmarks import taskworld_zoo as zoo_module
from benchmarks.bases import load_tiny
from benchmarks.taskworld import get_task, list_tasks, split_of
from benchmarks.training import TrainSpec, mean_losses, train_adapters
from benchmarks.taskworld_zoo import TINY_ZOO, ZooRecipe, build_zoo, load_zoo, task_pairs, zoo_hash
from tests.benchmarks.micro import MICRO

TASKS = ["plural", "add", "has_animal"]
RECIPE = ZooRecipe(train=TrainSpec(steps=3, rows_per_adapter=2), group_size=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAHUB_CACHE", str(tmp_path_factory.mktemp("base-cache")))
        return load_tiny(MICRO, progress=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAHUB_CACHE", str(tmp_path))
    return tmp_path


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_joint_training_equals_separate_runs(micro):
    """Each adapter gets gradients only from its rows, AdamW state is per element: one joint run = N runs."""
    spec = TrainSpec(steps=4, rows_per_adapter=4, lr=1e-2, targets=("q_proj", "down_proj"))
    data = {t: task_pairs(micro, t, "train", 4) for t in ("plural", "add")}  # all rows every step
    joint, _ = train_adapters(micro, data, spec, progress=False)
    alone = [train_adapters(micro, {t: data[t]}, replace(spec, seed=i), progress=False)[0][0]
             for i, t in enumerate(data)]
    for a, b in zip(joint, alone):
        assert a.name == b.name and set(a.modules) == set(b.modules)
        for path in a.modules:
            torch.testing.assert_close(a.modules[path].A, b.modules[path].A, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a.modules[path].B, b.modules[path].B, atol=1e-5, rtol=1e-4)
            assert a.modules[path].B.abs().max() > 0  # trained (B starts at zero)


def test_trained_adapters_lower_their_tasks_loss_and_leave_the_base_alone(micro):
    before = _state(micro.model)
    flags = [p.requires_grad for p in micro.model.parameters()]
    spec = TrainSpec(steps=30, rows_per_adapter=8, lr=1e-2)
    data = {t: task_pairs(micro, t, "train", 240) for t in ("plural", "add")}
    adapters, losses = train_adapters(micro, data, spec, progress=False)
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    fresh = [le.init_adapter(micro.model, f"{t}_untrained", spec.targets, r=spec.r, seed=0) for t in data]  # B = 0: the base
    for adapter, untrained, task in zip(adapters, fresh, data):
        held = task_pairs(micro, task, "test", 16)
        trained_loss, base_loss = mean_losses(micro, [adapter, untrained], held)
        assert trained_loss < base_loss
    after = _state(micro.model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [p.requires_grad for p in micro.model.parameters()] == flags


def test_mean_losses_equals_one_adapter_at_a_time(micro):
    spec = TrainSpec(steps=2, rows_per_adapter=2, lr=1e-2)
    adapters, _ = train_adapters(micro, {t: task_pairs(micro, t, "train", 4) for t in TASKS}, spec, progress=False)
    pairs = task_pairs(micro, "plural", "fewshot", 5)
    batched = mean_losses(micro, adapters, pairs)
    for adapter, value in zip(adapters, batched):
        assert mean_losses(micro, [adapter], pairs)[0] == pytest.approx(value, rel=1e-4)


def test_zoo_manifest_and_files(micro, cache):
    folder = build_zoo(micro, TASKS, RECIPE, progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [e["name"] for e in manifest["adapters"]] == TASKS
    for entry in manifest["adapters"]:
        task = get_task(entry["name"])
        assert entry["family"] == task.family and entry["description"] == task.instruction
        assert len(entry["samples"]) == 20 and len(set(entry["samples"])) == 20
        for sample in entry["samples"]:  # full prompts of train-split inputs
            head, _, rest = sample.partition("\ninput: ")
            assert head == task.instruction and rest.endswith("\nanswer:")
            assert split_of(task.name, rest[: -len("\nanswer:")]) == "train"
    zoo = le.AdapterZoo.load(folder)
    adapter = zoo["plural"]
    assert {m.A.dtype for m in adapter.modules.values()} == {torch.float16}
    assert {p.rsplit(".", 1)[-1] for p in adapter.modules} == set(RECIPE.train.targets)
    assert {m.rank for m in adapter.modules.values()} == {RECIPE.train.r}
    assert json.loads((folder / "build.json").read_text())["hash"] == zoo_hash(micro, TASKS, RECIPE)


def test_build_resumes_at_the_first_unfinished_group_and_reuses_a_finished_zoo(micro, cache, monkeypatch):
    folder = build_zoo(micro, TASKS, RECIPE, progress=False)
    first = le.AdapterZoo.load(folder)
    work = folder.parent
    (folder / "build.json").unlink()  # as if interrupted after group 0 finished
    shutil.rmtree(work / "groups" / "001")
    trained = []
    original = zoo_module.train_task_adapters
    monkeypatch.setattr(zoo_module, "train_task_adapters",
                        lambda base, tasks, *a, **k: trained.append(tasks) or original(base, tasks, *a, **k))
    build_zoo(micro, TASKS, RECIPE, progress=False)
    assert trained == [["has_animal"]]  # group 0 (plural, add) was skipped
    again = le.AdapterZoo.load(folder)
    for name in ("plural", "add", "has_animal"):  # deterministic: the resumed build equals the first one
        for path, module in first[name].modules.items():
            assert torch.equal(again[name].modules[path].B, module.B)
    monkeypatch.setattr(zoo_module, "train_task_adapters", lambda *a, **k: pytest.fail("the zoo is cached"))
    out = build_zoo(micro, TASKS, RECIPE, out=cache / "copy", progress=False)
    assert load_zoo(micro, TASKS, RECIPE).names == le.AdapterZoo.load(out).names == TASKS
    assert zoo_hash(micro, TASKS, RECIPE) != zoo_hash(micro, TASKS, replace(RECIPE, group_size=3))
    assert zoo_hash(micro, TASKS, RECIPE) != zoo_hash(micro, TASKS[:2], RECIPE)


def test_shipped_tiny_zoo_matches_the_shipped_base_and_the_recipe():
    """Fails when the tiny base, a training task or ZooRecipe changed: rebuild with
    `lorahub-engine build-zoo --base tiny --out benchmarks/assets/tiny_zoo` and commit the folder."""
    base = load_tiny()
    recorded = json.loads((TINY_ZOO / "build.json").read_text())["hash"]
    assert recorded == zoo_hash(base, list_tasks(held_out=False), ZooRecipe())


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_shipped_index_indexes_the_shipped_zoo(name):
    """Fails when a shipped zoo changed without its index: `lorahub-engine build-zoo --base NAME --out
    benchmarks/assets/NAME_zoo` writes both."""
    from retrieval import AdapterIndex

    zoo = le.AdapterZoo.load(zoo_module.SHIPPED[name], lazy=True)
    shipped = AdapterIndex.load(zoo_module.SHIPPED_INDEX[name])
    fresh = AdapterIndex.build(zoo, embedder=shipped.embedder)
    assert shipped.names == zoo.names
    queries = [adapter.metadata["samples"][0] for adapter in zoo][:12]
    for got, want in zip(shipped.search(queries, k=3), fresh.search(queries, k=3)):
        assert [n for n, _ in got] == [n for n, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)


def test_build_into_out_saves_groups_beside_it_and_refuses_foreign_groups(micro, cache):
    out = cache / "assets" / "zoo"
    groups = cache / "assets" / "zoo_groups"
    groups.mkdir(parents=True)
    (groups / "zoo_hash.json").write_text(json.dumps({"hash": "another-zoo"}))
    with pytest.raises(le.AdapterError, match="another zoo"):
        build_zoo(micro, TASKS, RECIPE, out=out, progress=False)
    shutil.rmtree(groups)
    folder = build_zoo(micro, TASKS, RECIPE, out=out, progress=False)
    assert folder == out and le.AdapterZoo.load(out).names == TASKS
    assert not groups.exists()  # the groups were merged into `out`, then removed
    record = json.loads((out / "build.json").read_text())
    assert [g["tasks"] for g in record["groups"]] == [["plural", "add"], ["has_animal"]]
    assert all(g["final_loss"] < g["first_loss"] for g in record["groups"])


def test_a_costly_zoo_is_never_built_on_demand(micro, cache, monkeypatch):
    smol = replace(micro, name="smollm2")  # stands for a base outside BUILT_ON_DEMAND
    monkeypatch.setitem(zoo_module.SHIPPED, "smollm2", cache / "not-shipped")
    monkeypatch.setattr(zoo_module, "train_task_adapters", lambda *a, **k: pytest.fail("must not train"))
    for check in (lambda: zoo_module.require_zoo("smollm2"), lambda: load_zoo(smol, TASKS, RECIPE)):
        with pytest.raises(zoo_module.ZooMissingError, match="lorahub-engine build-zoo --base smollm2 --out"):
            check()
    monkeypatch.undo()
    monkeypatch.setenv("LORAHUB_CACHE", str(cache))
    build_zoo(smol, TASKS, RECIPE, progress=False)  # built on purpose: now found
    zoo_module.require_zoo("smollm2")
    assert load_zoo(smol, TASKS, RECIPE).names == TASKS


def test_a_task_with_its_own_spec_trains_alone_and_a_rebuild_retrains_only_changed_groups(micro, cache,
                                                                                          monkeypatch):
    """task_train gives one task its own spec (here more rank): it trains alone, after the groups; rebuilding a
    zoo's folder under the changed recipe takes the groups whose content is unchanged from the zoo it replaces
    (bit for bit) and trains the rest; the zoo keeps the task list's order."""
    tasks = ["plural", "add", "has_animal", "count_animal"]
    out = cache / "assets" / "zoo"
    first = le.AdapterZoo.load(build_zoo(micro, tasks, RECIPE, out=out, progress=False))
    record = json.loads((out / "build.json").read_text())
    del record["groups"][0]["hash"]  # as a record written before groups had a hash: worked out from its recipe
    (out / "build.json").write_text(json.dumps(record))
    own = replace(RECIPE.train, r=8, steps=2)
    recipe = replace(RECIPE, task_train=(("count_animal", own),))
    assert zoo_module.training_groups(tasks, recipe) == [(["plural", "add"], RECIPE.train),
                                                         (["has_animal"], RECIPE.train), (["count_animal"], own)]
    trained = []
    original = zoo_module.train_task_adapters
    def train_and_count(base, group, spec, **kwargs):
        trained.append((group, spec))
        return original(base, group, spec, **kwargs)

    monkeypatch.setattr(zoo_module, "train_task_adapters", train_and_count)
    second = le.AdapterZoo.load(build_zoo(micro, tasks, recipe, out=out, progress=False))
    assert trained == [(["has_animal"], RECIPE.train), (["count_animal"], own)]  # (plural, add) taken as it was
    assert second.names == tasks
    assert json.loads((out / "build.json").read_text())["hash"] == zoo_hash(micro, tasks, recipe)
    for name in ("plural", "add"):
        for path, module in first[name].modules.items():
            kept = second[name].modules[path]
            assert torch.equal(kept.A, module.A) and torch.equal(kept.B, module.B)
    assert {m.rank for m in second["count_animal"].modules.values()} == {8}
    assert not torch.equal(next(iter(second["has_animal"].modules.values())).B,
                           next(iter(first["has_animal"].modules.values())).B)  # trained alone now: other draws
    assert zoo_hash(micro, tasks, RECIPE) == zoo_hash(micro, tasks, replace(RECIPE, task_train=()))
    assert ZooRecipe.from_json(json.loads(json.dumps(recipe.as_json()))) == recipe
