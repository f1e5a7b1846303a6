"""Timing for the benchmark scripts: one warm-up per case, then round-robin repeats, minimum and median; and
`run_info`, the record of a run (commit, threads, load) every benchmark JSON carries."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lorahub_engine.progress import progress_bar

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}  # process: CPU seconds of this process only


def measure(cases: dict[str, Callable[[], object]], device: torch.device, repeats: int, inner: int = 1,
            desc: str = "", clock: Callable[[], float] = time.perf_counter, reference: str | None = None) -> dict:
    """Seconds per call of each case: {"min": {case: s}, "median": {...}, "rounds": {case: [s per round]}}, after one
    warm-up each, over `repeats` round-robin passes of `inner` calls. Other processes on a shared CPU only ever add
    time: ratios of minimums are the fair ones on a quiet machine, medians the steadier ones on a busy one.

    With a `reference` case, each round also times the reference right before every other case, and "paired"
    holds {case: [(reference s, case s) per round]}: `paired_ratio` then compares times taken moments apart, which is
    the steadiest where the machine drifts."""
    for fn in cases.values():
        fn()
    times = {name: [] for name in cases}
    paired = {name: [] for name in cases if name != reference}

    def timed(fn) -> float:
        _sync(device)
        start = clock()
        for _ in range(inner):
            fn()
        _sync(device)
        return (clock() - start) / inner

    for _ in progress_bar(range(repeats), desc=desc, leave=False):
        for name, fn in cases.items():
            if reference is not None and name != reference:
                paired[name].append((timed(cases[reference]), timed(fn)))
                times[name].append(paired[name][-1][1])
            else:
                times[name].append(timed(fn))
    result = {"min": {n: min(t) for n, t in times.items()}, "median": {n: statistics.median(t) for n, t in times.items()},
              "rounds": times}
    if reference is not None:
        result.update(reference=reference, paired=paired)
    return result


def paired_ratio(timings: dict, case: str, reference: str) -> float:
    """Median over rounds of case / reference: each against the reference timed right before it where `measure` had
    this reference, else against the reference's time in the same round."""
    return statistics.median(c / r for r, c in pairs(timings, case, reference))


def pairs(timings: dict, case: str, reference: str) -> list[tuple[float, float]]:
    """(reference s, case s) per round, as `paired_ratio` compares them."""
    if timings.get("reference") == reference:
        return timings["paired"][case]
    return list(zip(timings["rounds"][reference], timings["rounds"][case]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_info(threads: int | None = None) -> dict:
    """What every benchmark JSON records about its run: the commit (with "-dirty" when tracked files differ from it),
    torch's thread count (or `threads`, where a script runs its work elsewhere), CPUs and the load average now."""
    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
        return run.stdout.strip() if run.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"commit": commit + ("-dirty" if dirty else ""), "threads": threads or torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg_start": list(os.getloadavg()),
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__}
