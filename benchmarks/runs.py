"""Finished (task, method, seed) runs of a cross-task benchmark in one JSON file, so that a stopped run resumes.

    store = RunStore("benchmarks/results/cross_task_smollm2.runs.json", key={"base": ..., "settings": ...})
    store.get("navigate", "icl", 0)             # None, or {"score", "tokens", "seconds", "finished", "info", ...}
    store.put("navigate", "icl", 0, run)        # written at once (temp file + rename)

A file written under another key (base, settings, zoo: its names and `zoo_digest`, the adapters' factors) is never
mixed in: opening it raises. Several processes may
share one file (`bench cross-task --workers N`): `put` holds an exclusive lock on `<file>.lock` while it reads the
file's runs back, adds its own and rewrites it, so no process drops another's runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from pathlib import Path

import torch

from lorahub_engine._io import write_json_atomic


class RunStore:
    def __init__(self, path: str | Path, key: dict):
        self.path, self.key = Path(path), json.loads(json.dumps(key))  # as it reads back from JSON
        self.runs: dict[str, dict] = self._read()

    @staticmethod
    def _name(task: str, method: str, seed: int) -> str:
        return f"{task}|{method}|{seed}"

    def get(self, task: str, method: str, seed: int) -> dict | None:
        return self.runs.get(self._name(task, method, seed))

    def put(self, task: str, method: str, seed: int, run: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self.runs = {**self._read(), self._name(task, method, seed): run}
            write_json_atomic(self.path, {"key": self.key, "runs": self.runs})

    def _read(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        data = json.loads(self.path.read_text())
        if data.get("key") != self.key:
            raise ValueError(f"{self.path} holds runs of another setting ({data.get('key')}); remove it or "
                             "write elsewhere")
        return data["runs"]

    @contextlib.contextmanager
    def _locked(self):
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def zoo_digest(zoo) -> str:
    """sha256 (16 hex digits) of every adapter's name, targets, scales and factor bytes: a rebuilt zoo keeps its
    names, so a runs file must record what the adapters were."""
    digest = hashlib.sha256()
    for adapter in zoo:
        digest.update(adapter.name.encode())
        for path, module in sorted(adapter.modules.items()):
            digest.update(f"{path}:{module.scale!r}:{module.A.dtype}".encode())
            for factor in (module.A, module.B):
                digest.update(factor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
