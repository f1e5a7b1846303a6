"""Timing for the benchmark scripts: one warm-up per case, then round-robin repeats, minimum and median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}  # process: CPU seconds of this process only


def measure(cases: dict[str, Callable[[], object]], device: torch.device, repeats: int, inner: int = 1,
            desc: str = "", clock: Callable[[], float] = time.perf_counter) -> dict:
    """Seconds per call of each case: {"min": {case: s}, "median": {...}, "rounds": {case: [s per round]}}, after one
    warm-up each, over `repeats` round-robin passes of `inner` calls. Other processes on a shared CPU only ever add
    time: ratios of minimums are the fair ones on a quiet machine, medians the steadier ones on a busy one, and
    `paired_ratio` (round by round) the steadiest where the machine drifts."""
    for fn in cases.values():
        fn()
    times = {name: [] for name in cases}
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for name, fn in cases.items():
            _sync(device)
            start = clock()
            for _ in range(inner):
                fn()
            _sync(device)
            times[name].append((clock() - start) / inner)
    return {"min": {n: min(t) for n, t in times.items()}, "median": {n: statistics.median(t) for n, t in times.items()},
            "rounds": times}


def paired_ratio(timings: dict, case: str, reference: str) -> float:
    """Median over rounds of case / reference, each round's two times taken moments apart."""
    rounds = timings["rounds"]
    return statistics.median(c / r for c, r in zip(rounds[case], rounds[reference]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
