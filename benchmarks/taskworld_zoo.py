"""The LoRA zoo: one adapter per taskworld training task, trained through our engine, cached and resumable.

    zoo = load_zoo(base)                              # shipped, cached, or built now (progress bars)
    build_zoo(base, tasks, ZooRecipe(), out=folder)   # the same build, written to a folder of your choice

Adapters are trained in groups (`group_size` at once, jointly, see training.py); each finished group is saved
under $LORAHUB_CACHE/zoo-<hash>/groups/, so an interrupted build resumes at the first unfinished group. The hash
covers the base's weights, the recipe and the task list. The manifest holds per adapter its family, its
instruction as description, and 20 train-split inputs as full prompts (instruction + input), as retrieval reads.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import lorahub_engine as le
from benchmarks.bases import cache_dir
from benchmarks.taskworld import examples, format_prompt, get_task, list_tasks
from benchmarks.training import TrainSpec, train_adapters
from lorahub_engine._io import write_json_atomic

TINY_ZOO = Path(__file__).parent / "assets" / "tiny_zoo"
BUILD_RECORD = "build.json"


@dataclass(frozen=True)
class ZooRecipe:
    """Everything besides the base and the task list that determines a zoo."""

    train: TrainSpec = field(default_factory=TrainSpec)
    group_size: int = 15  # adapters trained jointly and saved together (the unit of resumption)
    n_samples: int = 20  # train-split prompts per adapter in the manifest (retrieval)
    dtype: str = "float16"  # saved factors


def base_fingerprint(base) -> str:
    """sha256 of the base's config and weights (names, shapes, bytes): a changed base means a new zoo."""
    digest = hashlib.sha256(base.model.config.to_json_string().encode())
    for name, tensor in sorted(base.model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def zoo_hash(base, tasks: list[str], recipe: ZooRecipe) -> str:
    payload = {"base": base_fingerprint(base), "chat": base.chat, "recipe": asdict(recipe), "tasks": tasks,
               "data": [metadata(t, 3) for t in tasks]}  # instruction, family and first inputs of every task
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
                        desc: str = "training") -> list[le.LoraAdapter]:
    """One adapter per task on its `split` data (steps x rows_per_adapter draws), trained jointly."""
    n = spec.steps * spec.rows_per_adapter
    datasets = {t: task_pairs(base, t, split, n, seed=spec.seed) for t in tasks}
    adapters, _ = train_adapters(base, datasets, spec, progress, desc)
    return adapters


def build_zoo(base, tasks: list[str] | None = None, recipe: ZooRecipe = ZooRecipe(), out: str | Path | None = None,
              progress: bool = True) -> Path:
    """Build (or finish, or reuse) the zoo; returns its folder (`out` if given, else the cache's)."""
    tasks = list(tasks or list_tasks(held_out=False))
    key = zoo_hash(base, tasks, recipe)
    work = cache_dir() / f"zoo-{key}"
    final = work / "zoo"
    if _recorded_hash(final) != key:
        start = time.time()
        groups = [tasks[i:i + recipe.group_size] for i in range(0, len(tasks), recipe.group_size)]
        bar = tqdm(groups, desc="zoo groups", unit="group", disable=not progress)
        for g, group in enumerate(bar):
            folder = work / "groups" / f"{g:03d}"
            if (folder / "manifest.json").is_file():
                continue  # finished by an earlier run
            adapters = train_task_adapters(base, group, recipe.train, progress=progress,
                                           desc=f"group {g + 1}/{len(groups)}")
            le.AdapterZoo([_stored(a, recipe) for a in adapters]).save(folder)
        adapters = [a for g in range(len(groups)) for a in le.AdapterZoo.load(work / "groups" / f"{g:03d}")]
        record = {"hash": key, "tasks": tasks, "recipe": asdict(recipe), "base": base.name,
                  "seconds_this_run": round(time.time() - start, 1), "torch": torch.__version__,
                  "threads": torch.get_num_threads()}
        _save_with_record(le.AdapterZoo(adapters), final, record)
    if out is None:
        return final
    out = Path(out)
    if _recorded_hash(out) != key:
        _save_with_record(le.AdapterZoo.load(final), out, json.loads((final / BUILD_RECORD).read_text()))
    return out


def load_zoo(base, tasks: list[str] | None = None, recipe: ZooRecipe = ZooRecipe(),
             progress: bool = True) -> le.AdapterZoo:
    """The zoo for `base`: the shipped tiny zoo when its hash matches, else the cache, else a fresh build."""
    tasks = list(tasks or list_tasks(held_out=False))
    if _recorded_hash(TINY_ZOO) == zoo_hash(base, tasks, recipe):
        return le.AdapterZoo.load(TINY_ZOO)
    return le.AdapterZoo.load(build_zoo(base, tasks, recipe, progress=progress))


def _stored(adapter: le.LoraAdapter, recipe: ZooRecipe) -> le.LoraAdapter:
    stored = adapter.to(getattr(torch, recipe.dtype))
    return stored.with_modules(stored.modules, metadata=metadata(adapter.name, recipe.n_samples))


def _save_with_record(zoo: le.AdapterZoo, folder: Path, record: dict) -> None:
    """Save the zoo, then its build record (written last: a folder without it is not a finished zoo)."""
    zoo.save(folder)
    write_json_atomic(folder / BUILD_RECORD, record)


def _recorded_hash(folder: Path) -> str | None:
    try:
        return json.loads((Path(folder) / BUILD_RECORD).read_text())["hash"]
    except (OSError, ValueError, KeyError):
        return None

