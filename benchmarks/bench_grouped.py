"""Speed of grouped_lora alone and inside a SmolLM2-135M-shaped Llama, against PEFT, per-expert loops and dense.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_grouped [--repeats 5] [--layers 30] [--threads N] [--clock wall]
    (on a shared CPU: --threads 1 --clock process, so time other processes take is not counted)

Model: random Llama body (30 layers, hidden 576, intermediate 1536, 9 heads, 3 kv heads; no LM head), LoRA r=8 on
all 7 projections, a batch of 32 rows x 64 tokens. Every ratio compares timings of one run, taken round-robin (each
repeat times every case once, model-level repeats time the base again right before each case); model-level ratios
are medians over repeats of a case's time over the base's just before it (a shared box drifts by 10-15% from one
repeat to the next, little from one forward to the next), op-level ones use fastest repeats. Cases:
  model level   base forward; one adapter; 16 distinct adapters (one per row; ours vs PEFT `adapter_names=`);
                top-2 of 16 experts per token (ours vs all 16 computed densely), and per batch row (a retrieval
                mixture's or a LoraHub population's shape); training steps (forward + backward to the input
                embeddings and the LoRA factors) of the base and of top-2 of 16.
  op level      per projection shape over 2048 tokens, summed over the model's layers: grouped_lora vs a plain
                per-expert loop vs dense all-experts (fused: concatenated factors; each: one expert at a time),
                for 16 distinct adapters and per-token top-2 of 16.
  primitives    each backend primitive alone (plan, shrink, expand, outer; Triton on CUDA, torch on CPU): time and
                TFLOP/s per projection shape (CUDA: also GB/s).
The cases are in benchmarks/grouped/cases.py, their timings in timing.py, ratios, targets and the plot in report.py.
CPU runs use fp32 and the torch backend, CUDA runs bf16 and the Triton backend (`grouped_lora`'s "auto").
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from benchmarks.grouped.report import environment, plot, print_result, ratios, targets
from benchmarks.grouped.timing import model_level, op_level, primitive_level
from benchmarks.timing import CLOCKS
from lorahub_engine._io import write_json_atomic


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30, help="30 for SmolLM2-135M; fewer for a quick smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="process: CPU seconds of this process; with --threads 1 it ignores time lost to other "
                        "processes on a shared machine (never for CUDA, whose work runs off the process)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and args.clock == "process":
        parser.error("--clock process cannot see GPU work; use the wall clock on CUDA")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {"env": environment(device, dtype, args)}
    result["ops"] = op_level(args.layers, device, dtype, args.repeats, clock)
    result["model"] = model_level(args.layers, device, dtype, args.repeats, clock)
    result["primitives"] = primitive_level(device, dtype, args.repeats, clock)
    result["ratios"] = ratios(result["model"], result["ops"])
    result["targets"] = targets(result["ratios"])
    result["env"]["load_avg_end"] = os.getloadavg()
    print_result(result)
    out = args.out or Path(__file__).parent / "results" / f"bench_grouped_{device.type}.json"
    write_json_atomic(out, result, indent=1)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result



if __name__ == "__main__":
    main()
