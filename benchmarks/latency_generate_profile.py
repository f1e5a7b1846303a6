"""Base / ours / PEFT generate side by side on a few SmolLM2-shaped layers (1 request, 1 adapter, 48 new tokens),
and per LoRA layer call the time each adds over the base; `--profile` adds cProfile of ours (the dispatch's Python).
Two floors run in the same model, the LoRA layer's forward replaced for the run: `wrapped` (the wrapper module and
its base call only, no LoRA) and `two_matmuls` (that plus `out.addmm_(x @ A^T, B^T, alpha=scale)` written by hand):
ours minus two_matmuls is what the dispatch costs per call.

    HF_HUB_OFFLINE=1 python -m benchmarks.latency_generate_profile [--layers 6] [--rounds 5] [--threads 1]
                                                                   [--clock process] [--profile]

CPU seconds of the process (robust on a shared box; with 2 threads it counts both threads' time: `--clock wall`
on a quiet machine), best of the rounds, `--threads` torch threads (1). The full 30-layer table at 1
and 2 threads is benchmarks/bench_latency.py; this is its quick probe of the trivial routing's fixed cost.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats

import torch

import lorahub_engine as le
from benchmarks.bench_latency import NEW_TOKENS, PROMPT, VOCAB, build_causal_lm, peft_model, random_adapters
from benchmarks.timing import CLOCKS
from lorahub_engine.lora_layer import LoraLayer

PROJECTIONS = 7  # LoRA layer calls per decoder layer (every projection adapted)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="process")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    g = torch.Generator().manual_seed(0)
    base = build_causal_lm(args.layers)
    adapters = random_adapters(base, 16, g)
    ours, peft = le.attach(copy.deepcopy(base), adapters[:1]), peft_model(copy.deepcopy(base), adapters[:1])
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=g)
    options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)

    def routed():
        with le.routing(ours, torch.zeros(1, 1, dtype=torch.long)):
            return ours.generate(ids, **options)

    def replaced(forward):
        def run():
            original, LoraLayer.forward = LoraLayer.forward, forward
            try:
                return routed()
            finally:
                LoraLayer.forward = original
        return run

    runs = {"base": lambda: base.generate(ids, **options), "wrapped": replaced(_wrapped),
            "two_matmuls": replaced(_two_matmuls), "ours": routed, "peft": lambda: peft.generate(input_ids=ids, **options)}
    best = dict.fromkeys(runs, float("inf"))
    with torch.no_grad():
        for run in runs.values():
            run()
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = clock()
                run()
                best[name] = min(best[name], clock() - start)
        calls = NEW_TOKENS * args.layers * PROJECTIONS
        added = {name: (best[name] - best["base"]) / calls * 1e6 for name in runs if name != "base"}
        print({name: round(s, 3) for name, s in best.items()},
              {f"{name} - base per call (us)": round(us, 1) for name, us in added.items()})
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(routed)
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    return {"seconds": best, "added_us_per_call": added}


def _wrapped(layer: LoraLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    tokens = x.reshape(-1, x.shape[-1])
    return layer.base(tokens).view(*x.shape[:-1], -1)


def _two_matmuls(layer: LoraLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The attached bank's only adapter, by hand: what any LoRA layer must do at one token."""
    tokens = x.reshape(-1, x.shape[-1])
    out = layer.base(tokens)
    A, B, scale = layer.bank()
    out.addmm_(torch.nn.functional.linear(tokens, A[0]), B[0].t(), alpha=float(scale[0]))
    return out.view(*x.shape[:-1], -1)


if __name__ == "__main__":
    main()
