"""Finished (task, method, seed) runs of a cross-task benchmark in one JSON file, so that a stopped run resumes.

    store = RunStore("benchmarks/results/cross_task_smollm2.runs.json", key={"base": ..., "settings": ...})
    store.get("navigate", "icl", 0)             # None, or {"score", "tokens", "seconds", "info"}
    store.put("navigate", "icl", 0, run)        # written at once (temp file + rename)

A file written under another key (base, settings, zoo) is never mixed in: opening it raises.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorahub_engine._io import write_json_atomic


class RunStore:
    def __init__(self, path: str | Path, key: dict):
        self.path, self.key = Path(path), json.loads(json.dumps(key))  # as it reads back from JSON
        self.runs: dict[str, dict] = {}
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if data.get("key") != self.key:
                raise ValueError(f"{self.path} holds runs of another setting ({data.get('key')}); remove it or "
                                 "write elsewhere")
            self.runs = data["runs"]

    @staticmethod
    def _name(task: str, method: str, seed: int) -> str:
        return f"{task}|{method}|{seed}"

    def get(self, task: str, method: str, seed: int) -> dict | None:
        return self.runs.get(self._name(task, method, seed))

    def put(self, task: str, method: str, seed: int, run: dict) -> None:
        self.runs[self._name(task, method, seed)] = run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"key": self.key, "runs": self.runs})
