"""The torch backend's walks side by side on the same routings: compiled (the kernels walk the pairs), runs (batched
matmuls over chunks of constant routing, where the routing has them), dense (the whole bank as one matmul each way);
the walk the backend picks by itself; and the base projection they are added to.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_walks [--threads 1 2] [--repeats 5] [--clock wall|process]

Grid: banks of E experts of rank r (E * r from 32 to 512 columns), routings one expert per row (rows of 64 tokens, or
one token each) and top-k per token with softmax gates, a 576 -> 576 projection (SmolLM2-135M's q_proj), no grad.
Prints ms per call of each walk, the walk the backend picks and its time over the fastest walk's, and each walk's
time over the base projection's; checks every walk against the compiled one (fp32, 1e-4).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.timing import CLOCKS, measure, run_info
from lorahub_engine._io import write_json_atomic
from lorahub_engine.ops import grouped_lora, torch_backend

WIDTH = 576
BANKS = [(4, 8), (8, 8), (16, 8), (32, 4), (32, 8), (64, 8)]  # (E, r)
ROUTINGS = {"row, 32 x 1": (32, 1, "row"), "row, 8 x 64": (512, 1, "row"), "top-2, 8 x 64": (512, 2, "token"),
            "top-3, 8 x 128": (1024, 3, "token")}  # name: (tokens, k, per)


def case(E: int, r: int, T: int, k: int, per: str, g: torch.Generator):
    x = torch.randn(T, WIDTH, generator=g)
    A, B = torch.randn(E, r, WIDTH, generator=g) / 24, torch.randn(E, WIDTH, r, generator=g) / 24
    scale = torch.full((E,), 2.0)
    if per == "row":
        rows = 8 if T == 512 else T
        idx = torch.randint(0, E, (rows, 1), generator=g).repeat_interleave(T // rows, 0)
        return x, A, B, scale, idx, torch.ones(T, 1)
    gates, idx = torch.randn(T, E, generator=g).softmax(-1).topk(k, -1)
    return x, A, B, scale, idx, gates


def walked(walk: str, *args) -> torch.Tensor:
    """The op with the backend's walk forced ("compiled", "runs", "dense"), or as the backend picks it ("picked")."""
    forced = {"compiled": {"DENSE_COLUMNS_PER_SLOT": 0, "MIN_RUN": 10**9}, "runs": {"DENSE_COLUMNS_PER_SLOT": 0},
              "dense": {"DENSE_COLUMNS_PER_SLOT": 10**9, "DENSE_MIN_PAIRS": 0, "MIN_RUN": 10**9}, "picked": {}}[walk]
    defaults = {name: getattr(torch_backend, name) for name in forced}
    for name, value in forced.items():
        setattr(torch_backend, name, value)
    try:
        return grouped_lora(*args, backend="torch")
    finally:
        for name, value in defaults.items():
            setattr(torch_backend, name, value)


def picked_walk(x, A, idx) -> str:
    plan = torch_backend.plan(idx, A.shape[0])
    return plan.walk(A.shape[1], x, A)


def run(threads: int, repeats: int, clock) -> list[dict]:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(WIDTH, WIDTH, generator=g) / 24
    rows = []
    with torch.no_grad():
        for E, r in BANKS:
            for name, (T, k, per) in ROUTINGS.items():
                args = case(E, r, T, k, per, g)
                x, A, idx = args[0], args[1], args[4]
                walks = ["compiled", "runs", "dense"] if torch_backend.plan(idx, E).runs is not None else [
                    "compiled", "dense"]
                reference = walked("compiled", *args)
                for walk in walks[1:] + ["picked"]:
                    torch.testing.assert_close(walked(walk, *args), reference, rtol=1e-4, atol=1e-4)
                cases = {"base": lambda: torch.nn.functional.linear(x, weight)}
                cases.update({w: (lambda w=w: walked(w, *args)) for w in walks + ["picked"]})
                timing = measure(cases, torch.device("cpu"), repeats, desc=f"E={E} r={r} {name}", clock=clock)
                ms = {w: 1e3 * s for w, s in timing["median"].items()}
                best = min(ms[w] for w in walks)
                row = {"threads": threads, "E": E, "r": r, "routing": name, "ms": ms, "picked": picked_walk(x, A, idx),
                       "picked/best": ms["picked"] / best, "over_base": {w: ms[w] / ms["base"] for w in walks}}
                rows.append(row)
                print(f"{threads} thr  E={E:3d} r={r} ({E * r:3d} cols)  {name:15s}  "
                      + "  ".join(f"{w} {ms[w]:7.3f}" for w in walks)
                      + f"  ms; picks {row['picked']} ({row['picked/best']:.2f} of the best)  over base: "
                      + " ".join(f"{w} {v:.2f}" for w, v in row["over_base"].items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_walks.json"))
    args = parser.parse_args(argv)
    result = {"config": {k: str(v) for k, v in vars(args).items()}, "run": run_info(), "rows": []}
    for threads in args.threads:
        result["rows"] += run(threads, args.repeats, CLOCKS[args.clock])
        write_json_atomic(args.out, result, indent=1)
    return result


if __name__ == "__main__":
    main()
