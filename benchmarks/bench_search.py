"""Cost of a LoraHub search's evaluations: the reference's merge-and-rerun against routing gates on attached adapters.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_search [--base tiny|smollm2] [--candidates 40] [--repeats 3]
        [--threads 1] [--clock process|wall] [--ways fast_one_by_one ...]

20 adapters and the 5 few-shot examples of the held-out task `navigate`; the same `--candidates` weight vectors
(uniform in [-1.5, 1.5], seeded) for every way. Adapter sets: tiny: 20 adapters of its shipped zoo (seeded draw);
smollm2 (SmolLM2-135M-Instruct, offline GGUF), each in the same run: `random_qv`, 20 random r=8 LoRAs on q_proj and
v_proj of every layer (LoraHub's targets), and `zoo`, 20 adapters drawn from the shipped SmolLM2 zoo (r=4 on q, v,
down of layers 14-29 of 30).
  merge_and_rerun   LoraHub's released code: per candidate, merge the factors (le.merge "lorahub"), fold them into
                    a fresh copy of the base, run the examples (one padded batch)
  padded_*          the engine as it was: adapters attached once, each candidate only sets the fusion gates; one
                    padded batch of the examples (by_length, share_prompt, reuse_prefix all False)
  lengths_*         the examples in groups of equal length, padding trimmed (by_length=True only)
  prompt_*          the opening tokens all examples share run once per candidate, a KV cache (share_prompt=True only)
  prefix_*          the layers below the lowest adapted one run once, their output reused (reuse_prefix=True only)
  packed_*          each candidate's examples laid end to end in one sequence, no padding (pack=True only)
  fast_*            all four
  default_*         FewShotObjective's defaults, what lorahub_search runs (share_prompt, reuse_prefix and pack on,
                    by_length off: on one CPU thread its extra forwards cost more than the padding they save)
  *_one_by_one / *_population_8 / *_population_all: 1, 8 or all candidates per batched forward
  default_setup     building the default FewShotObjective (its checks and the prefix capture), once per search
The optimizer is left out (it proposes the same number of points in every way). Every way must give the same
cross-entropies (checked); the script prints ms per candidate, the speedups over merge_and_rerun, and the speedup
of one search of 40 candidates one by one, LoraHub's sequential loop (default_setup + 40 x default_one_by_one against
40 x merge_and_rerun).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import numpy as np
import torch

import lorahub_engine as le
from benchmarks.timing import CLOCKS, measure, run_info
from lorahub_engine._io import write_json_atomic
from lorahub_engine.fewshot import example_losses
from lorahub_engine.search import FewShotObjective, encode_pairs, random_modules

TASK, MODULES, SEED, SEARCH = "navigate", 20, 0, 40  # SEARCH: LoraHub's budget, candidates of one search
NONE = dict(by_length=False, share_prompt=False, reuse_prefix=False, pack=False)
LEVERS = {"padded": NONE, "lengths": {**NONE, "by_length": True}, "prompt": {**NONE, "share_prompt": True},
          "prefix": {**NONE, "reuse_prefix": True}, "packed": {**NONE, "pack": True},
          "fast": dict(by_length=True, share_prompt=True, reuse_prefix=True, pack=True),
          "default": {}}  # FewShotObjective's defaults: what lorahub_search uses
WAYS = {  # base -> (lever, population) per way; population None = all candidates in one forward
    "tiny": [(lever, p) for lever in LEVERS for p in (1, 8, None)],
    "smollm2": [("padded", 1), ("padded", 8), ("lengths", 1), ("prompt", 1), ("prefix", 1), ("packed", 1),
                ("fast", 1), ("fast", 8), ("default", 1), ("default", 8)],
}


def setup(base_name: str):
    """(base, {adapter set: the 20 adapters in fp32}, the encoded examples)."""
    from benchmarks.bases import load_base
    from benchmarks.taskworld import examples, get_task
    from benchmarks.taskworld_zoo import load_zoo

    base = load_base(base_name)
    task = get_task(TASK)
    shots = [(base.prompt(task.instruction, x), y) for x, y in examples(task, "fewshot", 5, seed=SEED)]
    zoo = load_zoo(base, progress=False)
    sets = {"zoo": [zoo[name] for name in random_modules(zoo.names, MODULES, seed=SEED)]}
    if base_name == "smollm2":
        sets = {"random_qv": [random_lora(base.model, f"random{i}", seed=i) for i in range(MODULES)], **sets}
    sets = {name: [a.to(torch.float32) for a in adapters] for name, adapters in sets.items()}
    return base, sets, encode_pairs(base.model, base.tokenizer, shots)


def random_lora(model, name: str, seed: int) -> le.LoraAdapter:
    """PEFT's initialization with a random B (PEFT starts B at 0), so that every adapter changes the output."""
    adapter = le.init_adapter(model, name, ["q_proj", "v_proj"], r=8, alpha=16, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return adapter.with_modules({p: le.LoraModule(m.A, torch.randn(m.B.shape, generator=g) * 0.02, m.scale)
                                 for p, m in adapter.modules.items()})


def merge_and_rerun(model, adapters, batch, weights: torch.Tensor) -> torch.Tensor:
    """[P] cross-entropies the reference's way: a merged copy of the model per candidate."""
    losses = []
    for w in weights.tolist():
        merged = le.merge_into_base(copy.deepcopy(model), le.merge(adapters, w, "lorahub"))
        losses.append(example_losses(merged, batch).mean())
    return torch.stack(losses)


def gates(objective: FewShotObjective, weights: torch.Tensor, population: int) -> torch.Tensor:
    """[P] cross-entropies with `population` candidates per batched forward."""
    return torch.cat([objective.cross_entropy(weights[i:i + population]) for i in range(0, len(weights), population)])


def way_name(lever: str, population: int | None) -> str:
    return f"{lever}_" + {1: "one_by_one", None: "population_all"}.get(population, f"population_{population}")


def time_set(model, adapters, batch, weights, ways, repeats: int, clock: str) -> dict:
    """Timings of every way on one adapter set (each checked against merge_and_rerun first)."""
    cases = {"merge_and_rerun": lambda: merge_and_rerun(model, adapters, batch, weights)}
    reference = cases["merge_and_rerun"]()
    attached = le.attach(copy.deepcopy(model), adapters)
    levers = dict.fromkeys(lever for lever, _ in ways)  # in the ways' order: the same sequence in every process
    objectives = {lever: FewShotObjective(attached, batch, **LEVERS[lever]) for lever in levers}
    for lever, population in ways:
        name = way_name(lever, population)
        cases[name] = lambda o=objectives[lever], p=population or len(weights): gates(o, weights, p)
        diff = float((cases[name]() - reference).abs().max())
        if diff > 1e-4:
            raise AssertionError(f"{name} disagrees with merge_and_rerun by {diff:.2e}")
    if "default" in objectives:
        cases["default_setup"] = lambda: FewShotObjective(attached, batch)
    timings = measure(cases, torch.device("cpu"), repeats, desc="evaluations", clock=CLOCKS[clock])
    per_candidate = {name: t / len(weights) for name, t in timings["median"].items() if name != "default_setup"}
    mr = per_candidate["merge_and_rerun"]
    result = {"seconds_per_candidate": per_candidate,
              "speedup_over_merge_and_rerun": {n: mr / t for n, t in per_candidate.items()},
              "reused_layers": {lever: o.reused_layers for lever, o in objectives.items()},
              "length_groups": {lever: len(o.groups) for lever, o in objectives.items()},
              "shared_tokens": {lever: o.shared_tokens for lever, o in objectives.items()},
              "timings_s": timings}
    if "default_one_by_one" in per_candidate:
        setup_s = timings["median"]["default_setup"]
        result["default_setup_s"] = setup_s
        result["search_speedup"] = SEARCH * mr / (setup_s + SEARCH * per_candidate["default_one_by_one"])
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", choices=tuple(WAYS), default="tiny")
    parser.add_argument("--candidates", type=int, default=40, help="weight vectors evaluated (LoraHub's budget: 40)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="process",
                        help="process: CPU seconds of this process (steady on a shared box); wall: elapsed seconds")
    parser.add_argument("--ways", nargs="+", default=None, metavar="WAY",
                        help="time only these ways (e.g. fast_one_by_one; default: every way of the base), "
                             "merge_and_rerun always")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = run_info()
    ways = [way for way in WAYS[args.base] if args.ways is None or way_name(*way) in args.ways]
    unknown = set(args.ways or ()) - {way_name(*way) for way in WAYS[args.base]}
    if unknown:
        parser.error(f"unknown ways for --base {args.base}: {sorted(unknown)}")
    base, sets, batch = setup(args.base)
    model = base.model.eval()
    rng = np.random.default_rng(SEED)
    weights = torch.from_numpy(rng.uniform(-1.5, 1.5, (args.candidates, MODULES))).float()
    with torch.no_grad():
        results = {name: time_set(model, adapters, batch, weights, ways, args.repeats, args.clock)
                   for name, adapters in sets.items()}
    lengths = batch.attention_mask.sum(-1).tolist()
    result = {"env": {**info, "base": args.base, "clock": args.clock, "repeats": args.repeats,
                      "candidates": args.candidates, "ways": [way_name(*way) for way in ways], "modules": MODULES,
                      "examples": len(lengths),
                      "example_tokens": lengths, "load_avg_end": list(os.getloadavg())},
              "sets": results}
    print(json.dumps(result["env"]))
    for set_name, r in results.items():
        print(f"{set_name}: reused layers {r['reused_layers']}, shared tokens {r['shared_tokens']}, "
              f"length groups {r['length_groups']}")
        for name, t in r["seconds_per_candidate"].items():
            print(f"  {name:26s} {t * 1e3:8.2f} ms / candidate   {r['speedup_over_merge_and_rerun'][name]:5.2f}x")
        if "search_speedup" in r:
            print(f"  one search of {SEARCH} one by one, defaults (setup {r['default_setup_s'] * 1e3:.0f} ms): "
                  f"{r['search_speedup']:.2f}x over merge_and_rerun")
    out = args.out or Path(__file__).parent / "results" / f"bench_search_{args.base}.json"
    write_json_atomic(out, result, indent=1)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
