"""Carry into a runs file for a rebuilt zoo the runs that the rebuild cannot have changed; the rest rerun.

    python -m benchmarks.carry_runs OLD.runs.json NEW.runs.json --base smollm2 --changed logic_not any_true ...
    lorahub-engine bench cross-task --base smollm2 --out NEW_FOLDER --resume     # reruns what was not carried

A run is carried when its method reads no zoo adapter (ADAPTER_FREE), or when it composes adapters it chose without
reading their factors (by the retrieval index or the seed: CHOSEN_BLIND), recorded them in `info["adapters"]`, and
none of them is in `--changed`. Every other run reruns: best_single, which scores every adapter to choose, and the
methods that do not record what they used (retrieval_mixture, arrow, ...). The new file's key is the current zoo's
(`cross_task.runs_key`); the old file must hold runs of a zoo with the same adapter names, settings and seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.bases import BASES, load_base
from benchmarks.cross_task import runs_key
from benchmarks.harness import Settings
from benchmarks.taskworld_zoo import load_zoo
from lorahub_engine._io import write_json_atomic

ADAPTER_FREE = ("zero_shot", "icl", "upper_shots_lora", "upper_task_lora")
CHOSEN_BLIND = ("uniform_retrieved", "task_arithmetic", "ties", "dare_ties", "lorahub", "retrieval_lorahub")


def carried(name: str, run: dict, changed: set[str]) -> bool:
    """Whether run `name` ("task|method|seed") would come out the same on the rebuilt zoo."""
    method = name.split("|")[1]
    if method in ADAPTER_FREE:
        return True
    used = run.get("info", {}).get("adapters")
    return method in CHOSEN_BLIND and used is not None and not changed.intersection(used)


def carry(old: Path, new: Path, key: dict, changed: set[str]) -> tuple[int, int]:
    """Write `new` (key `key`) with the runs of `old` that are carried; returns (carried, left to rerun)."""
    data = json.loads(old.read_text())
    previous = data["key"]
    same = {field: previous.get(field) == key[field] for field in ("base", "settings", "seeds", "zoo")}
    if not all(same.values()):
        raise ValueError(f"{old} ran another base, settings, seeds or adapter names: {same}")
    unknown = changed.difference(key["zoo"])
    if unknown:
        raise ValueError(f"--changed names adapters the zoo does not have: {sorted(unknown)}")
    runs = {name: run for name, run in data["runs"].items() if carried(name, run, changed)}
    write_json_atomic(new, {"key": key, "runs": runs})
    return len(runs), len(data["runs"]) - len(runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.carry_runs", description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="runs file of the zoo before the rebuild")
    parser.add_argument("new", type=Path, help="runs file to write for the current zoo (must not exist)")
    parser.add_argument("--base", required=True, choices=BASES, help="the base whose current zoo the new file is for")
    parser.add_argument("--changed", nargs="+", required=True, metavar="ADAPTER",
                        help="the adapters the rebuild retrained")
    args = parser.parse_args(argv)
    if args.new.exists():
        parser.error(f"{args.new} exists; carrying never overwrites runs")
    old_key = json.loads(args.old.read_text())["key"]
    base = load_base(args.base)
    key = runs_key(base.name, Settings(**old_key["settings"]), old_key["seeds"], load_zoo(base))
    kept, left = carry(args.old, args.new, key, set(args.changed))
    print(f"{kept} runs carried into {args.new}, {left} left to rerun")


if __name__ == "__main__":
    main()
