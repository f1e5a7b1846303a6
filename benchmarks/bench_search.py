"""Cost of a LoraHub search's evaluations: the reference's merge-and-rerun against routing gates on attached adapters.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_search [--base tiny|smollm2] [--candidates 40] [--repeats 3]

20 adapters and the 5 few-shot examples of the held-out task `navigate`; the same `--candidates` weight vectors
(uniform in [-1.5, 1.5], seeded) for every way. tiny: the shipped base and 20 adapters of its zoo (seeded draw);
smollm2: SmolLM2-135M-Instruct (offline GGUF) with 20 random r=8 LoRAs on q_proj and v_proj (LoraHub's targets).
  merge_and_rerun  LoraHub's released code: per candidate, merge the factors (le.merge "lorahub"), fold them into a
                   fresh copy of the base, run the examples
  gates_one_by_one the engine: adapters attached once, each candidate only sets the fusion gates (population 1)
  gates_population_8 / _all   8 or all candidates per batched forward (one merged expert per candidate and layer)
The optimizer is left out (it proposes the same number of points in every way). Every way must give the same
cross-entropies (checked); the script prints seconds per candidate and the speedups over merge_and_rerun.
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

TASK, MODULES, SEED = "navigate", 20, 0


def setup(base_name: str):
    """(base, the 20 adapters in fp32, the encoded examples)."""
    from benchmarks.bases import load_base
    from benchmarks.taskworld import examples, get_task
    from benchmarks.zoo import load_zoo

    base = load_base(base_name)
    task = get_task(TASK)
    shots = [(base.prompt(task.instruction, x), y) for x, y in examples(task, "fewshot", 5, seed=SEED)]
    if base_name == "tiny":
        zoo = load_zoo(base, progress=False)
        adapters = [zoo[name] for name in random_modules(zoo.names, MODULES, seed=SEED)]
    else:
        adapters = [random_lora(base.model, f"random{i}", seed=i) for i in range(MODULES)]
    return base, [a.to(torch.float32) for a in adapters], encode_pairs(base.model, base.tokenizer, shots)


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--candidates", type=int, default=40, help="weight vectors evaluated (LoraHub's budget: 40)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = run_info()
    base, adapters, batch = setup(args.base)
    model = base.model.eval()
    rng = np.random.default_rng(SEED)
    weights = torch.from_numpy(rng.uniform(-1.5, 1.5, (args.candidates, MODULES))).float()
    cases = {"merge_and_rerun": lambda: merge_and_rerun(model, adapters, batch, weights)}
    with torch.no_grad():
        reference = cases["merge_and_rerun"]()
        attached = le.attach(copy.deepcopy(model), adapters)
        objective = FewShotObjective(attached, batch)
        for name, population in (("gates_one_by_one", 1), ("gates_population_8", 8),
                                 ("gates_population_all", args.candidates)):
            cases[name] = lambda population=population: gates(objective, weights, population)
            diff = float((cases[name]() - reference).abs().max())
            if diff > 1e-4:
                raise AssertionError(f"{name} disagrees with merge_and_rerun by {diff:.2e}")
        timings = measure(cases, torch.device("cpu"), args.repeats, desc="evaluations", clock=CLOCKS["process"])
    per_candidate = {name: t / args.candidates for name, t in timings["median"].items()}
    result = {
        "env": {**info, "base": args.base, "clock": "process", "repeats": args.repeats, "candidates": args.candidates,
                "modules": MODULES, "examples": int(batch.input_ids.shape[0]), "load_avg_end": list(os.getloadavg())},
        "seconds_per_candidate": per_candidate,
        "speedup_over_merge_and_rerun": {n: per_candidate["merge_and_rerun"] / t for n, t in per_candidate.items()},
        "timings_s": timings,
    }
    print(json.dumps(result["env"]))
    for name, t in per_candidate.items():
        print(f"  {name:22s} {t * 1e3:8.2f} ms / candidate   {result['speedup_over_merge_and_rerun'][name]:5.2f}x")
    out = args.out or Path(__file__).parent / "results" / f"bench_search_{args.base}.json"
    write_json_atomic(out, result, indent=1)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
