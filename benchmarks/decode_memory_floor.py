"""The memory floor of a many-adapter decode step: what reading the adapters costs against the grouped op itself.

    HF_HUB_OFFLINE=1 python -m benchmarks.decode_memory_floor [--threads 1 2] [--adapters 16] [--rows 32]

A SmolLM2-135M-shaped decode step calls 210 LoRA layers (30 layers x 7 projections); with `--rows` requests routed
to `--adapters` distinct r=8 adapters, each call reads every adapter's factors of that layer. Here each of the 210
calls has its own bank (so they are cold, as in the model), and one step is timed three ways: `read` (a sum over
every bank: the bytes at this machine's read bandwidth), `grouped` (the grouped op on each bank, per-row routing),
and the bandwidth of one 200 MB sum. Milliseconds per step, best of 10; compare with the base decode step of
benchmarks/bench_latency.py's 32 x 16 scenario.
"""

from __future__ import annotations

import argparse
import time

import torch

from lorahub_engine.ops.grouped import TokenRouting, grouped_lora_routed

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # q k v o gate up down
LAYERS, RANK = 30, 8


def best_ms(fn, rounds: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rows", type=int, default=32)
    args = parser.parse_args(argv)
    E, T = args.adapters, args.rows
    banks = [(torch.randn(E, RANK, d_in) * 0.01, torch.randn(E, RANK, d_out).transpose(1, 2) * 0.01, torch.ones(E))
             for d_in, d_out in SHAPES * LAYERS]  # B rank-major, as attach stores it
    inputs = {d_in: torch.randn(T, d_in) for d_in, _ in SHAPES}
    outs = [torch.zeros(T, B.shape[1]) for _, B, _ in banks]
    routing = TokenRouting((torch.arange(T) % E)[:, None])
    big = torch.randn(50_000_000)  # 200 MB
    megabytes = sum(A.numel() + B.numel() for A, B, _ in banks) * 4 / 1e6

    def grouped():
        for (A, B, scale), out in zip(banks, outs):
            grouped_lora_routed(inputs[A.shape[2]], A, B, scale, routing, out=out, check=False)

    def read():
        for A, B, _ in banks:
            A.sum(), B.sum()

    report = {"adapter_MB_per_step": megabytes}
    with torch.no_grad():
        for threads in args.threads:
            torch.set_num_threads(threads)
            row = {"read_GB_per_s": 0.2 / (best_ms(big.sum) / 1e3), "read_ms": best_ms(read),
                   "grouped_ms": best_ms(grouped)}
            report[threads] = row
            print(f"{threads} thread(s): adapters {megabytes:.0f} MB per step; " +
                  "  ".join(f"{k} {v:.1f}" for k, v in row.items()))
    return report


if __name__ == "__main__":
    main()
