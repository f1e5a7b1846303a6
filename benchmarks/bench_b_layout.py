"""Why a bank stores B rank-major: the expand's matmuls with each expert's B^T read through a transposed view of a
contiguous B [E, out, r] (the layout before) against B^T contiguous ([E, r, out] memory: attach's layout now).

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_b_layout [--threads 1 2] [--repeats 9]

Cases: one token, one expert (`out.addmm_(u, B_e^T)`, the one-expert plan's expand in decode), and the compiled
expand (`native.expand`) at decode shapes: rows of one token each routed to E experts, r = 8, SmolLM2-135M's
widths. Prints microseconds per call (minimum over round-robin repeats) and old / new; checks both give the same sums (fp32, to rounding).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.timing import measure, run_info
from lorahub_engine._io import write_json_atomic
from lorahub_engine.ops import native, torch_backend

RANK = 8
COMPILED = [(4, 4, 1536), (32, 16, 576), (32, 16, 1536), (128, 16, 1536)]  # (tokens, experts, out)


def layouts(E: int, out: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """B^T [E, r, out] of one bank, as the transposed view of a contiguous B and as a contiguous tensor."""
    B = torch.randn(E, out, RANK, generator=g)
    return {"old": B.transpose(1, 2), "new": B.transpose(1, 2).contiguous()}


def one_token(repeats: int, g: torch.Generator, inner: int = 2000) -> dict:
    u, target = torch.randn(1, RANK, generator=g), torch.zeros(1, 1536)
    Bt = layouts(1, 1536, g)
    cases = {name: (lambda t=t[0]: target.addmm_(u, t, alpha=2.0)) for name, t in Bt.items()}
    torch.testing.assert_close(u @ Bt["old"][0], u @ Bt["new"][0])
    return measure(cases, torch.device("cpu"), repeats, inner, desc="one token")["min"]


def compiled(T: int, E: int, out: int, repeats: int, g: torch.Generator, inner: int = 300) -> dict:
    plan = torch_backend.SegmentPlan((torch.arange(T) % E)[:, None], E)
    pair, token, expert = plan.tiled
    u, coef = torch.randn(T, RANK, generator=g), torch.rand(T, generator=g)
    Bt = layouts(E, out, g)
    sums = {name: torch.zeros(T, out) for name in Bt}
    for name, t in Bt.items():
        native.expand(u, coef, t, expert, token, pair, torch_backend.NATIVE_TILE, sums[name])
    torch.testing.assert_close(sums["old"], sums["new"])
    target = torch.zeros(T, out)
    cases = {name: (lambda t=t: native.expand(u, coef, t, expert, token, pair, torch_backend.NATIVE_TILE, target))
             for name, t in Bt.items()}
    return measure(cases, torch.device("cpu"), repeats, inner, desc=f"compiled {T}x{E}x{out}")["min"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_b_layout.json")
    args = parser.parse_args(argv)
    if native.library() is None:
        raise SystemExit("no C++ compiler here: the compiled expand cannot be built")
    result = {"run": run_info(), "threads": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        rows = {"one token, one expert (addmm_)": one_token(args.repeats, g)}
        for T, E, out in COMPILED:
            rows[f"compiled expand, {T} tokens, {E} experts, out {out}"] = compiled(T, E, out, args.repeats, g)
        result["threads"][threads] = {name: {k: v * 1e6 for k, v in t.items()} for name, t in rows.items()}
        print(f"=== {threads} thread(s): us per call, B^T through a transposed view (old) / contiguous (new)")
        for name, t in result["threads"][threads].items():
            print(f"  {name:48s} old {t['old']:8.1f}  new {t['new']:8.1f}  old/new {t['old'] / t['new']:.2f}")
    write_json_atomic(args.out, result, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
