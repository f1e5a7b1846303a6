"""What validation chose in a cross-task runs file: per validated method and task, how often each option won over
the seeds, and the mean score.

    python -m benchmarks.validation_choices benchmarks/results/search_rows/cross_task_tiny.runs.json

For rows validated by exact match it also answers a counterfactual from the recorded held-out scores: had ties on
exact match gone to the fallbacks (w = 0, then the single adapter) instead of to the lowest cross-entropy, which
runs would have returned w = 0, and the mean score then (w = 0 answers as zero-shot does: its composition adds
nothing to the base; the task's zero_shot run supplies the score). Runs where that rule picks another option than
the one run (not w = 0) cannot be scored from the file; they are counted apart. `--margin m` asks the same of a
stricter rule: w = 0 wins unless another option answers a share of the held-out shots more than m above its own
(m = 0.2: at least two more shots of five, leave-one-out).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

from lorahub_engine.search.validate import best_option, option_name

KINDS = ("search", "single", "zero")


def ties_to_fallback(held_out: dict, margin: float = 0.0) -> str:
    """The option that validate="exact_match_fallback" picks (ties on held-out exact match go to w = 0, then the
    single adapter, then the search with the lowest cross-entropy); w = 0 also wins where no option beats its share
    by more than `margin`."""
    best = max(score["exact_match"] for score in held_out.values())
    if best - held_out["zero"]["exact_match"] <= margin + 1e-9:
        return "zero"
    return best_option(held_out, prefer_fallbacks=True)


def _option(validation: dict) -> str:
    """The held-out option name of what validation chose."""
    if validation["kind"] != "search":
        return validation["kind"]
    return option_name(validation["l1"], validation["evaluations"])


def summarize(runs: dict, margin: float = 0.0) -> list[dict]:
    """One row per (method, task) whose runs record a validation: counts per kind, mean score, counterfactual
    (ties_to_fallback with `margin`)."""
    rows: dict[tuple[str, str], dict] = {}
    for key, run in runs.items():
        task, method, _ = key.split("|")
        validation = (run.get("info") or {}).get("validation")
        if validation is None:
            continue
        row = rows.setdefault((method, task), {"method": method, "task": task, "kinds": Counter(), "scores": [],
                                               "fallback_scores": [], "unknown": 0, "to_zero": 0})
        row["kinds"][validation["kind"]] += 1
        row["scores"].append(run["score"])
        held = validation["held_out"]
        if not all(isinstance(s, dict) and s.get("exact_match") is not None for s in held.values()):
            continue  # ranked by cross-entropy alone: no counterfactual
        pick, zero = ties_to_fallback(held, margin), runs.get(f"{task}|zero_shot|0")
        if pick == _option(validation):
            row["fallback_scores"].append(run["score"])
        elif pick == "zero" and zero is not None:
            row["fallback_scores"].append(zero["score"])
            row["to_zero"] += 1
        else:
            row["unknown"] += 1
    return [{**row, "kinds": {k: row["kinds"][k] for k in KINDS}, "mean": statistics.fmean(row["scores"]),
             "fallback_mean": (statistics.fmean(row["fallback_scores"]) if row["fallback_scores"] and not row["unknown"]
                               else None)} for row in rows.values()]


def _counterfactual(row: dict) -> str:
    """The counterfactual's cell: "runs sent to w = 0, the mean score then (runs it cannot score)"; "-" for rows
    ranked by cross-entropy alone."""
    if not row["fallback_scores"] and not row["unknown"]:
        return "-"
    mean = "-" if row["fallback_mean"] is None else f"{row['fallback_mean']:.3f}"
    return f"{row['to_zero']}, {mean} ({row['unknown']})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", help="a cross-task runs file (benchmarks/runs.py)")
    p.add_argument("--margin", type=float, default=0.0,
                   help="the counterfactual's margin: the share of held-out shots an option must answer right above "
                        "w = 0's to win (default 0: ties to w = 0)")
    args = p.parse_args(argv)
    runs = json.loads(Path(args.runs).read_text())["runs"]
    rule = "ties to fallback" if args.margin == 0 else f"w = 0 unless beaten by > {args.margin:g}"
    print(f"| method | task | search / single / zero | mean score | {rule}: runs to w = 0, mean (unknown) |")
    print("|---|---|---|---|---|")
    for row in sorted(summarize(runs, args.margin), key=lambda r: (r["method"], r["task"])):
        kinds = " / ".join(str(row["kinds"][k]) for k in KINDS)
        print(f"| {row['method']} | {row['task']} | {kinds} | {row['mean']:.3f} | {_counterfactual(row)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
