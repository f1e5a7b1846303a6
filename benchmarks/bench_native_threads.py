"""The compiled walk's kernels (`lorahub_engine/ops/native.py`) at one thread and at two, the two-thread call split
across OpenMP's team or kept whole, side by side in one run.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_native_threads [--repeats 9]

Shapes: decoding (32 rows of one token each, one of 16 experts per row, r = 8, SmolLM2-135M's widths) and top-2 of
16 experts per token over 512 tokens (a router over a wide bank). Prints microseconds per call (minimum over
round-robin repeats) and the speed-ups; checks the split leaves every output bit unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.timing import measure, run_info
from lorahub_engine._io import write_json_atomic
from lorahub_engine.ops import native, torch_backend

RANK = 8
SHAPES = [(32, 1, 16, 576, 576), (32, 1, 16, 576, 1536), (32, 1, 16, 1536, 576), (512, 2, 16, 576, 1536)]
# (tokens, experts per token, experts, in, out)
WHOLE = 1 << 62  # a MIN_SPLIT no call reaches: one range


def primitives(T: int, k: int, E: int, n: int, m: int, g: torch.Generator) -> dict:
    """shrink, expand (into an existing output) and outer of one routing, each a call with fresh outputs."""
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # (T, k) distinct experts per token
    plan = torch_backend.SegmentPlan(idx, E)
    pair, token, expert = plan.tiled
    x, A = torch.randn(T, n, generator=g), torch.randn(E, RANK, n, generator=g)
    Bt, coef = torch.randn(E, RANK, m, generator=g), torch.rand(T * k, generator=g)
    u, left = torch.randn(T * k, RANK, generator=g), torch.randn(T * k, RANK, generator=g)
    out, u_out, g_out = torch.zeros(T, m), torch.zeros(T * k, RANK), torch.zeros(E, RANK, n)
    return {
        "shrink": (lambda: native.shrink(x, A, expert, token, pair, u_out), u_out),
        "expand": (lambda: native.expand(u, coef, Bt, expert, token, pair, torch_backend.NATIVE_TILE, out), out),
        "outer": (lambda: native.outer(left.index_select(0, pair), x, expert, token, g_out), g_out),
    }


def setting(threads: int, min_split: int):
    def apply():
        torch.set_num_threads(threads)
        native.MIN_SPLIT = min_split
    return apply


def run_case(call, apply, inner: int):
    def case():
        apply()
        for _ in range(inner):
            call()
    return case


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_native_threads.json")
    args = parser.parse_args(argv)
    if native.library() is None:
        raise SystemExit("no C++ compiler here: the compiled kernels cannot be built")
    threads, default_split = torch.get_num_threads(), native.MIN_SPLIT
    settings = {"1 thread": setting(1, default_split), "2 threads, whole": setting(2, WHOLE),
                "2 threads, split": setting(2, default_split)}
    result = {"run": run_info(), "min_split": default_split, "us": {}}
    g = torch.Generator().manual_seed(0)
    try:
        for T, k, E, n, m in SHAPES:
            for name, (call, output) in primitives(T, k, E, n, m, g).items():
                outputs = {}
                for label, apply in settings.items():
                    apply()
                    output.zero_()
                    call()
                    outputs[label] = output.clone()
                assert all(torch.equal(o, outputs["1 thread"]) for o in outputs.values()), f"{name}: split changed bits"
                inner = max(1, 20_000 // T)
                cases = {label: run_case(call, apply, inner) for label, apply in settings.items()}
                times = measure(cases, torch.device("cpu"), args.repeats, desc=f"{name} {T}x{k} of {E}, {n}->{m}")["min"]
                us = {label: t / inner * 1e6 for label, t in times.items()}
                row = f"{name}, {T} tokens x top-{k} of {E}, in {n}, out {m}"
                result["us"][row] = us
                print(f"{row:48s} 1t {us['1 thread']:7.1f}  2t whole {us['2 threads, whole']:7.1f}  2t split "
                      f"{us['2 threads, split']:7.1f} us   split vs 1t {us['1 thread'] / us['2 threads, split']:.2f}x"
                      f"  split vs whole {us['2 threads, whole'] / us['2 threads, split']:.2f}x", flush=True)
    finally:
        setting(threads, default_split)()
    write_json_atomic(args.out, result, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
