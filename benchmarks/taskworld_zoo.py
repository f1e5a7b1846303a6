"""The LoRA zoo: one adapter per taskworld training task, trained through our engine, cached and resumable.

    zoo = load_zoo(base)                              # shipped, cached, or (tiny only) built now
    build_zoo(base, out="benchmarks/assets/smollm2_zoo")   # build or finish a base's zoo into a folder

Each base has its recipe and task list (`RECIPES`, `TASKS`): tiny trains every training task; smollm2, whose step
is ~250x dearer, a subset covering every family with a recipe sized for ~2.5 h of one core. Adapters are trained
in groups (`group_size` at once, jointly, see training.py); each finished group is saved at once (under
$LORAHUB_CACHE/zoo-<hash>/groups/, or next to `out` in `<out>_groups/`), so an interrupted build resumes at the
first unfinished group. The hash covers the base's weights, the recipe and the task list. A task of
`recipe.task_train` trains alone with its own spec, after the groups; each group has a content hash of its own, and
a build into the folder of a finished zoo takes from it the groups whose hash is unchanged. The manifest holds per
adapter its family, its instruction as description, and 20 train-split inputs as full prompts (instruction +
input), as retrieval reads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from lorahub_engine.progress import progress_bar
import lorahub_engine as le
from benchmarks.bases import cache_dir
from benchmarks.taskworld import examples, format_prompt, get_task, list_tasks
from benchmarks.training import TrainSpec, train_adapters
from lorahub_engine._io import write_json_atomic
from lorahub_engine.errors import AdapterFileError

ASSETS = Path(__file__).parent / "assets"
TINY_ZOO = ASSETS / "tiny_zoo"
SHIPPED = {"tiny": TINY_ZOO, "smollm2": ASSETS / "smollm2_zoo"}
SHIPPED_INDEX = {name: ASSETS / f"{name}_zoo_index" for name in SHIPPED}  # each shipped zoo's retrieval index
BUILT_ON_DEMAND = ("tiny",)  # bases whose zoo builds in minutes; others must be built on purpose
BUILD_RECORD = "build.json"
GROUP_RECORD = "group.json"


@dataclass(frozen=True)
class ZooRecipe:
    """Everything besides the base and the task list that determines a zoo."""

    train: TrainSpec = field(default_factory=TrainSpec)
    group_size: int = 15  # adapters trained jointly and saved together (the unit of resumption)
    n_samples: int = 20  # train-split prompts per adapter in the manifest (retrieval)
    dtype: str = "float16"  # saved factors
    task_train: tuple[tuple[str, TrainSpec], ...] = ()  # (task, its own spec): trained alone, after the groups

    def as_json(self) -> dict:
        """The recipe as hashed and recorded; without task_train when it has none (hashes made before the field
        existed stay valid)."""
        record = asdict(self)
        if not self.task_train:
            del record["task_train"]
        return record

    @classmethod
    def from_json(cls, record: dict) -> ZooRecipe:
        def spec(d: dict) -> TrainSpec:
            return TrainSpec(**{**d, "targets": tuple(d["targets"])})

        return cls(train=spec(record["train"]), group_size=record["group_size"], n_samples=record["n_samples"],
                   dtype=record["dtype"], task_train=tuple((t, spec(d)) for t, d in record.get("task_train", ())))


def training_groups(tasks: list[str], recipe: ZooRecipe) -> list[tuple[list[str], TrainSpec]]:
    """(tasks trained jointly, their spec): the tasks without a spec of their own in order, `group_size` at a time,
    then each task of `recipe.task_train` alone."""
    own = dict(recipe.task_train)
    shared = [t for t in tasks if t not in own]
    size = recipe.group_size
    return [(shared[i:i + size], recipe.train) for i in range(0, len(shared), size)] + [
        ([t], own[t]) for t in tasks if t in own]


def layer_targets(modules: tuple[str, ...], layers: range) -> tuple[str, ...]:
    """LoRA targets (path suffixes) on the given decoder layers only."""
    return tuple(f"layers.{i}.{m}" for i in layers for m in modules)


# SmolLM2: 28 of the 60 training tasks, all 11 families, the held-out tasks' neighbours first (has_vehicle <-
# has_animal, count_birds <- count_animal, zorbish_* <- phrase_from_zorbish, spell_plural <- spell_word + plural,
# sum_of_extremes <- max/min_of_list + add, navigate <- position, ...). Ordered by prompt length (23-51 tokens
# without the default system turn) so that each jointly trained group pads little.
SMOLLM2_TASKS = (
    "opposite", "plural", "last_letter", "topic_words", "first_letter", "close_last_bracket", "positive_word",
    "first_alphabetically", "sentiment_review", "add", "count_animal", "sort_words", "reverse_list", "count_words",
    "larger", "spell_word", "has_animal", "word_category", "subtract", "topic_sentence", "logic_not",
    "phrase_from_zorbish", "any_true", "logic_and", "min_of_list", "max_of_list", "counter", "position",
)
# LoRA on the upper 16 of 30 layers only: the backward stops at layer 14 (~0.7x the cost of a full-depth step).
# r=4 on q/v/down there: 0.52 MB per adapter in fp16.
_SMOLLM2_TRAIN = TrainSpec(r=4, alpha=8.0, steps=80, rows_per_adapter=8, lr=2e-3, max_length=96,
                           targets=layer_targets(("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"),
                                                 range(14, 30)))
RECIPES = {
    "tiny": ZooRecipe(),
    # phrase_from_zorbish's made-up vocabulary does not fit rank 4 (0.03 at 320 steps, 0.40 at rank 16: RESULTS.md);
    # its 2.1 MB bring the zoo's 28 adapters to 16.6 MB (15.9 MiB).
    "smollm2": ZooRecipe(train=_SMOLLM2_TRAIN, group_size=4,
                         task_train=(("phrase_from_zorbish", replace(_SMOLLM2_TRAIN, r=16, alpha=32.0, steps=320)),)),
}
TASKS = {"smollm2": SMOLLM2_TASKS}  # default: every training task


class ZooMissingError(AdapterFileError):
    """A base's zoo is neither shipped nor cached, and too costly to build without being asked."""


def default_tasks(base) -> list[str]:
    return list(TASKS.get(base.name) or list_tasks(held_out=False))


def default_recipe(base) -> ZooRecipe:
    return RECIPES.get(base.name, ZooRecipe())


def build_command(base_name: str) -> str:
    return f"lorahub-engine build-zoo --base {base_name} --out {SHIPPED.get(base_name, '<folder>')}"


def require_zoo(base_name: str) -> None:
    """Fail fast (before loading the base) when no zoo of `base_name` was ever finished, shipped or cached, and
    it is not built on demand. `load_zoo` still checks that a found zoo matches the base and recipe."""
    if base_name in BUILT_ON_DEMAND:
        return
    folders = [SHIPPED[base_name]] if base_name in SHIPPED else []
    folders += [f / "zoo" for f in cache_dir().glob("zoo-*")]
    if not any(_read_json(f / BUILD_RECORD).get("base") == base_name for f in folders):
        raise ZooMissingError(_missing(base_name))


def _missing(base_name: str) -> str:
    return (f"no {base_name} zoo is built (none in {SHIPPED.get(base_name)} nor in {cache_dir()}); build it first "
            f"(about 1.9 h of one core): {build_command(base_name)}")


def base_fingerprint(base) -> str:
    """sha256 of the base's config and weights (names, shapes, bytes): a changed base means a new zoo."""
    digest = hashlib.sha256(base.model.config.to_json_string().encode())
    for name, tensor in sorted(base.model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def zoo_hash(base, tasks: list[str], recipe: ZooRecipe) -> str:
    return _zoo_hash(base_identity(base), tasks, recipe)


def _zoo_hash(base_key: dict, tasks: list[str], recipe: ZooRecipe) -> str:
    payload = {**base_key, "recipe": recipe.as_json(), "tasks": tasks,
               "data": [metadata(t, 3) for t in tasks]}  # instruction, family and first inputs of every task
    return _digest(payload)


def group_hash(base_key: dict, tasks: list[str], spec: TrainSpec, recipe: ZooRecipe) -> str:
    """What one training group's adapters are a function of: the base, its tasks (in order), their spec and data,
    and how they are stored. A rebuild takes a group of the same hash from the zoo it replaces."""
    return _digest({**base_key, "tasks": tasks, "train": asdict(spec), "dtype": recipe.dtype,
                    "n_samples": recipe.n_samples, "data": [metadata(t, 3) for t in tasks]})


def base_identity(base) -> dict:
    """The base as the adapters see it: its weights' fingerprint and, for chat bases, how a prompt is rendered
    (template, system turn)."""
    key = {"base": base_fingerprint(base), "chat": base.chat}
    if base.chat:
        key["render"] = base.render("{prompt}")
    return key


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def task_pairs(base, task: str, split: str, n: int, seed: int = 0, distinct: bool = False) -> list[tuple[str, str]]:
    """(prompt as the base reads it, answer) pairs of a task's split."""
    instruction = get_task(task).instruction
    return [(base.render(format_prompt(instruction, x)), y) for x, y in examples(task, split, n, seed, distinct)]


def metadata(task: str, n_samples: int) -> dict:
    """Manifest entry of a task's adapter: family, instruction as description, full-prompt samples."""
    spec = get_task(task)
    samples = [format_prompt(spec.instruction, x) for x, _ in examples(task, "train", n_samples, seed=0)]
    return {"family": spec.family, "description": spec.instruction, "samples": samples}


def train_task_adapters(base, tasks: list[str], spec: TrainSpec, split: str = "train", progress: bool = True,
                        desc: str = "training", on_step=None) -> tuple[list[le.LoraAdapter], list[float]]:
    """One adapter per task on its `split` data (steps x rows_per_adapter draws), trained jointly; the adapters
    and the loss per step (`on_step(loss)` after each)."""
    n = spec.steps * spec.rows_per_adapter
    datasets = {t: task_pairs(base, t, split, n, seed=spec.seed) for t in tasks}
    return train_adapters(base, datasets, spec, progress, desc, on_step)


def build_zoo(base, tasks: list[str] | None = None, recipe: ZooRecipe | None = None,
              out: str | Path | None = None, progress: bool = True) -> Path:
    """Build (or finish, or reuse) the zoo; returns its folder (`out` if given, else the cache's).

    With `out`, finished groups go to `<out>_groups/` (removed once `out` holds the whole zoo); without, to the
    cache. A bar over every remaining training step shows the loss and the ETA.
    """
    tasks = list(tasks or default_tasks(base))
    recipe = recipe or default_recipe(base)
    base_key = base_identity(base)
    key = _zoo_hash(base_key, tasks, recipe)
    work = cache_dir() / f"zoo-{key}"
    final, groups_dir = work / "zoo", work / "groups"
    if out is not None:
        final, groups_dir = Path(out), Path(out).with_name(Path(out).name + "_groups")
        cached = work / "zoo"
        if _recorded_hash(final) != key and _recorded_hash(cached) == key:  # built before: copy it
            _save_with_record(le.AdapterZoo.load(cached), final, _read_json(cached / BUILD_RECORD))
    if _recorded_hash(final) == key:
        return final
    _claim(groups_dir, key)
    start = time.time()
    groups = training_groups(tasks, recipe)
    hashes = [group_hash(base_key, group, spec, recipe) for group, spec in groups]
    todo = [g for g in range(len(groups)) if not (groups_dir / f"{g:03d}" / "manifest.json").is_file()]
    todo = [g for g in todo if not _reuse_group(final, base_key, hashes[g], groups_dir / f"{g:03d}")]
    bar = progress_bar(total=sum(groups[g][1].steps for g in todo), desc=f"{base.name} zoo", unit="step",
                       progress=progress, mininterval=1 if sys.stderr.isatty() else 30)
    for g in todo:
        (group, spec), group_start, cpu_start = groups[g], time.time(), time.process_time()
        bar.set_description(f"{base.name} zoo, group {g + 1}/{len(groups)}")
        adapters, losses = train_task_adapters(base, group, spec, progress=False,
                                               on_step=lambda loss: _advance(bar, loss))
        le.AdapterZoo([_stored(a, recipe) for a in adapters]).save(groups_dir / f"{g:03d}")
        tail = losses[-10:]
        record = {"tasks": group, "hash": hashes[g], "seconds": round(time.time() - group_start, 1),
                  "cpu_seconds": round(time.process_time() - cpu_start, 1),
                  "first_loss": round(losses[0], 4), "final_loss": round(sum(tail) / len(tail), 4)}
        write_json_atomic(groups_dir / f"{g:03d}" / GROUP_RECORD, record)
        bar.write(f"group {g + 1}/{len(groups)} saved ({', '.join(group)}): {record['seconds']} s, "
                  f"loss {record['first_loss']} -> {record['final_loss']}")
    bar.close()
    trained = {a.name: a for g in range(len(groups)) for a in le.AdapterZoo.load(groups_dir / f"{g:03d}")}
    adapters = [trained[t] for t in tasks]  # the zoo in the task list's order, whatever the grouping
    group_records = [_read_json(groups_dir / f"{g:03d}" / GROUP_RECORD) for g in range(len(groups))]
    record = {"hash": key, "tasks": tasks, "recipe": recipe.as_json(), "base": base.name,
              "seconds_this_run": round(time.time() - start, 1), "groups": group_records,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    _save_with_record(le.AdapterZoo(adapters), final, record)
    if out is not None:
        shutil.rmtree(groups_dir)
    return final


def load_zoo(base, tasks: list[str] | None = None, recipe: ZooRecipe | None = None,
             progress: bool = True) -> le.AdapterZoo:
    """The zoo for `base`: the shipped one when its hash matches, else the cache, else a fresh build (bases in
    BUILT_ON_DEMAND only; for the others `ZooMissingError` names the command that builds it)."""
    tasks = list(tasks or default_tasks(base))
    recipe = recipe or default_recipe(base)
    key = zoo_hash(base, tasks, recipe)
    for folder in (SHIPPED.get(base.name), cache_dir() / f"zoo-{key}" / "zoo"):
        if folder is not None and _recorded_hash(folder) == key:
            return le.AdapterZoo.load(folder)
    if base.name not in BUILT_ON_DEMAND:
        raise ZooMissingError(_missing(base.name))
    return le.AdapterZoo.load(build_zoo(base, tasks, recipe, progress=progress))


def load_zoo_index(base_name: str, zoo: le.AdapterZoo):
    """The retrieval index shipped with the base's zoo when it indexes exactly these adapters, else one built now
    from the zoo's sample prompts (`AdapterIndex.build(zoo)`, which is how the shipped one was made)."""
    from retrieval import AdapterIndex

    folder = SHIPPED_INDEX.get(base_name)
    if folder is not None and folder.is_dir():
        index = AdapterIndex.load(folder)
        if sorted(index.names) == sorted(zoo.names):
            return index
    return AdapterIndex.build(zoo)


def _reuse_group(previous: Path, base_key: dict, wanted: str, folder: Path) -> bool:
    """Copy into `folder` the group of hash `wanted` from the finished zoo in `previous` (the zoo this build
    replaces: a changed recipe retrains only the groups it changed); False when that zoo has no such group."""
    record = _read_json(previous / BUILD_RECORD)
    for group, found in zip(record.get("groups", ()), _recorded_group_hashes(record, base_key)):
        if found == wanted:
            zoo = le.AdapterZoo.load(previous, lazy=True)
            le.AdapterZoo([zoo[t] for t in group["tasks"]]).save(folder)
            write_json_atomic(folder / GROUP_RECORD, {**group, "hash": wanted, "reused_from": record["hash"]})
            return True
    return False


def _recorded_group_hashes(record: dict, base_key: dict) -> list[str | None]:
    """The hash of each group of a finished zoo's build record: as recorded, or (records written before groups had
    one) worked out from its recipe and tasks, if the record's zoo hash shows it was built on this base."""
    if not record.get("groups"):
        return []
    if all("hash" in g for g in record["groups"]):
        return [g["hash"] for g in record["groups"]]
    try:
        recipe = ZooRecipe.from_json(record["recipe"])
    except (KeyError, TypeError):
        return []
    if _zoo_hash(base_key, record["tasks"], recipe) != record.get("hash"):
        return []
    return [group_hash(base_key, group, spec, recipe) for group, spec in training_groups(record["tasks"], recipe)]


def _advance(bar, loss: float) -> None:
    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    bar.update()


def _claim(groups_dir: Path, key: str) -> None:
    """Mark a groups folder as this zoo's; a folder holding another zoo's groups is an error, never mixed in."""
    mark = groups_dir / "zoo_hash.json"
    if mark.is_file():
        found = _read_json(mark).get("hash")
        if found != key:
            raise AdapterFileError(f"{groups_dir} holds groups of another zoo (hash {found}, this one {key}): "
                                   "remove it or build into another folder")
        return
    groups_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(mark, {"hash": key})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _stored(adapter: le.LoraAdapter, recipe: ZooRecipe) -> le.LoraAdapter:
    stored = adapter.to(getattr(torch, recipe.dtype))
    return stored.with_modules(stored.modules, metadata=metadata(adapter.name, recipe.n_samples))


def _save_with_record(zoo: le.AdapterZoo, folder: Path, record: dict) -> None:
    """Save the zoo, then its build record (written last: a folder without it is not a finished zoo)."""
    zoo.save(folder)
    write_json_atomic(folder / BUILD_RECORD, record)


def _recorded_hash(folder: Path) -> str | None:
    return _read_json(Path(folder) / BUILD_RECORD).get("hash")

