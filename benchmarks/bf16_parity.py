"""How far bf16 alone moves bench_grouped's model-level parity (ours vs PEFT, 16 adapters one per row): the same
comparison in fp32 and bf16 on the CPU with the torch backend, at a few depths of the random body.

    HF_HUB_OFFLINE=1 python -m benchmarks.bf16_parity [--layers 1 4 30]

Prints, per depth and dtype, max |ours - PEFT| of the last hidden states, their max |value|, and how far the adapters
move them from the base (4 rows x 32 tokens of bench_grouped's inputs).
"""

from __future__ import annotations

import argparse
import copy

import torch

import lorahub_engine as le
from benchmarks.grouped.cases import EXPERTS, ROWS, SEED, SEQ, build_body, max_diff, peft_model, random_adapters


def parity(layers: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(SEED)
    base = build_body(layers, torch.device("cpu"), dtype)
    adapters = random_adapters(base, EXPERTS, g)
    ours, peft = le.attach(copy.deepcopy(base), adapters), peft_model(copy.deepcopy(base), adapters)
    ids = torch.randint(0, 49152, (ROWS, SEQ), generator=g)[:4, :32]
    rows = torch.arange(4) % EXPERTS
    with torch.inference_mode():
        a = ours(ids, adapter_ids=rows).last_hidden_state
        b = peft(input_ids=ids, adapter_names=[adapters[i].name for i in rows.tolist()]).last_hidden_state
        c = base(ids).last_hidden_state
    return {"ours_vs_peft": max_diff(a, b), "max_abs": float(b.abs().max()), "adapters_move": max_diff(b, c)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bf16_parity", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4, 30])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for layers in args.layers:
        for dtype in (torch.float32, torch.bfloat16):
            row = parity(layers, dtype)
            print(f"layers {layers:2d} {str(dtype)[6:]:8s} " + "  ".join(f"{k} {v:.3g}" for k, v in row.items()),
                  flush=True)


if __name__ == "__main__":
    main()
