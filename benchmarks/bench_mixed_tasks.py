"""A mixed-task test set: inputs of many training tasks in one batch, each method answering all of them at once.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_mixed_tasks [--base tiny|smollm2] [--tasks 12] [--n-test 25]
                                                            [--methods ...] [--resume]

Tasks: 12 of the zoo's training tasks spread over it; test inputs from their test splits, shuffled together. Methods:
  zero_shot           the base
  oracle              each input on its own task's zoo adapter (knows the task: the upper reference)
  merge_*             static merges, one adapter for every input: uniform over the whole zoo, uniform over the
                      tasks of the set, TIES (density 0.2) over the tasks of the set; best_static = the best of them
  retrieval_mixture   per input, its top-3 zoo adapters by retrieval, outputs averaged
  arrow               Arrow over the whole zoo, top-3 per token
  mole_mixture        MoLE gates over the whole zoo trained on a mixture of every zoo task's train split
  sira / loramoe      new trainable experts with their routers (benchmarks/moe_methods.py), trained on the same
                      mixture; their expert usage per layer is plotted next to the JSON
  multitask_lora      one LoRA trained on that mixture, as many trainable parameters as sira
Reported: exact match over the set, and the share of the gap between the best static merge and the oracle
that each router closes ((method - best_static) / (oracle - best_static)).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
from pathlib import Path

import torch

import lorahub_engine as le
from benchmarks.bases import BASES, load_base
from benchmarks.moe_methods import train_moe, train_multitask_lora
from benchmarks.router_methods import train_mixture_router
from benchmarks.taskworld import accuracy, examples, format_prompt, get_task
from benchmarks.taskworld_zoo import load_zoo, load_zoo_index
from lorahub_engine._io import write_json_atomic
from lorahub_engine.compose import assignment, retrieve
from lorahub_engine.fewshot import generate_answers
from routers import ArrowConfig, attach_router, load_router, router_stats
from routers.cli import plot_usage


def mixed_set(zoo, n_tasks: int, n_test: int) -> list[tuple[str, str, str]]:
    """(task, input, answer) triples of n_tasks zoo tasks spread over the zoo's order (every 5th of the tiny zoo's 60,
    every 2nd of SmolLM2's 28), shuffled (seed 0)."""
    tasks = zoo.names[::max(1, len(zoo.names) // n_tasks)][:n_tasks]
    items = [(t, x, y) for t in tasks for x, y in examples(t, "test", n_test, seed=0)]
    random.Random(0).shuffle(items)
    return items


def answers(base, items, routed=contextlib.nullcontext, batch: int = 50) -> list[str]:
    """Greedy answers in batches; routed(rows) gives the context that routes those rows (a slice of items)."""
    out = []
    for start in range(0, len(items), batch):
        rows = slice(start, start + batch)
        prompts = [base.prompt(get_task(t).instruction, x, ()) for t, x, _ in items[rows]]
        with routed(rows):
            out += generate_answers(base.model, base.tokenizer, prompts, max_new_tokens=24)
    return out


def method_runs(base, zoo, items, output: Path) -> dict:
    """{method: answers-producing thunk} over the mixed set; each runs with the base clean and leaves it clean."""
    names, tasks = zoo.names, sorted({t for t, _, _ in items})
    merges = {"merge_uniform_zoo": (names, "task_arithmetic", {}), "merge_uniform_set": (tasks, "task_arithmetic", {}),
              "merge_ties_set": (tasks, "ties", {"density": 0.2})}

    def oracle():
        ids = torch.tensor([names.index(t) for t, _, _ in items])
        with le.attached(base.model, list(zoo)):
            return answers(base, items, lambda r: le.routing(base.model, ids[r]))

    def retrieval_mixture():
        prompts = [format_prompt(get_task(t).instruction, x) for t, x, _ in items]
        idx, gates = assignment(retrieve(load_zoo_index(base.name, zoo), prompts, 3), names, 3)
        with le.attached(base.model, list(zoo)):
            return answers(base, items, lambda r: le.routing(base.model, idx[r], gates[r]))

    def merge(label):
        chosen, method, options = merges[label]
        weights = [1 / len(chosen)] * len(chosen) if method == "task_arithmetic" else [1.0] * len(chosen)
        adapter = le.merge([zoo[n] for n in chosen], weights, method, seed=0, name=label, **options)
        with le.attached(base.model, [adapter]):
            le.set_weights(base.model, [1.0])
            return answers(base, items)

    def routed(attach):
        try:
            attach()
            return answers(base, items)
        finally:
            le.detach(base.model)

    def mole_mixture():
        with torch.enable_grad():
            folder = train_mixture_router(base, zoo, Path(tempfile.mkdtemp(prefix="mole_mixture.")), progress=True)
        return routed(lambda: load_router(base.model, folder, experts=list(zoo)))

    def moe(method):
        with torch.enable_grad():
            folder = train_moe(base, zoo, method, Path(tempfile.mkdtemp(prefix=f"{method}_mixture.")) / "router",
                               progress=True)
        try:
            load_router(base.model, folder)
            out = answers(base, items)
            stats = router_stats(base.model)
            experts = [f"expert{e}" for e in range(len(next(iter(stats.values()))["mean_gate"]))]
            plot_usage(stats, experts, str(output.with_name(f"{output.stem}_{method}_usage.png")))
            return out
        finally:
            le.detach(base.model)

    def multitask_lora():
        with torch.enable_grad():
            adapter = train_multitask_lora(base, zoo, progress=True)
        with le.attached(base.model, [adapter]):
            le.set_weights(base.model, [1.0])
            return answers(base, items)

    return {
        "zero_shot": lambda: answers(base, items),
        "oracle": oracle,
        "retrieval_mixture": retrieval_mixture,
        **{label: (lambda label=label: merge(label)) for label in merges},
        "arrow": lambda: routed(lambda: attach_router(base.model, ArrowConfig(top_k=3), list(zoo))),
        "mole_mixture": mole_mixture,
        "sira": lambda: moe("sira"),
        "loramoe": lambda: moe("loramoe"),
        "multitask_lora": multitask_lora,
    }


METHODS = ("zero_shot", "oracle", "retrieval_mixture", "merge_uniform_zoo", "merge_uniform_set", "merge_ties_set",
           "arrow", "mole_mixture", "sira", "loramoe", "multitask_lora")
ROUTERS = ("retrieval_mixture", "arrow", "mole_mixture", "sira", "loramoe", "multitask_lora")
REQUIRED = ("oracle", "merge_uniform_zoo", "merge_uniform_set", "merge_ties_set")  # the gap's two ends


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=BASES, default="tiny")
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--n-test", type=int, default=25)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="the oracle and the three merges always run (they define the gap)")
    parser.add_argument("--output", type=Path, help="JSON of the scores (default benchmarks/results/"
                                                    "bench_mixed_tasks[_BASE].json); rewritten after every method")
    parser.add_argument("--resume", action="store_true", help="keep the scores the output already holds")
    args = parser.parse_args(argv)
    output = args.output or Path("benchmarks/results") / (
        "bench_mixed_tasks.json" if args.base == "tiny" else f"bench_mixed_tasks_{args.base}.json")
    torch.set_num_threads(1)
    base = load_base(args.base)
    zoo = load_zoo(base)
    items = mixed_set(zoo, args.tasks, args.n_test)
    truth = [y for _, _, y in items]
    config = {"base": args.base, "tasks": args.tasks, "n_test": args.n_test}
    old = json.loads(output.read_text()) if args.resume and output.exists() else {}
    scores = dict(old.get("exact_match", {})) if old.get("config") == config else {}
    methods = method_runs(base, zoo, items, output)
    for name in [m for m in METHODS if m in args.methods or m in REQUIRED]:
        if name in scores:
            continue
        with torch.no_grad():
            scores[name] = accuracy(methods[name](), truth)
        print(f"{name:<20} {scores[name]:.3f}", flush=True)
        write_json_atomic(output, summary(config, items, scores))
    result = summary(config, items, scores)
    for name, value in result["exact_match"].items():
        closed = result["gap_closed"].get(name)
        print(f"{name:<20} {value:.3f}" + ("" if closed is None else f"   gap closed {closed:+.2f}"))
    return result


def summary(config: dict, items, scores: dict) -> dict:
    """The scores with best_static and the share of the best_static -> oracle gap each router closes."""
    scores = dict(scores)
    merges = [scores[m] for m in REQUIRED[1:] if m in scores]
    if merges:
        scores["best_static"] = max(merges)
    gap = scores["oracle"] - scores["best_static"] if "oracle" in scores and merges else 0.0
    closed = {m: (scores[m] - scores["best_static"]) / gap for m in ROUTERS if m in scores and gap}
    return {"config": config, "tasks": sorted({t for t, _, _ in items}), "n_items": len(items), "exact_match": scores,
            "gap_closed": closed}


if __name__ == "__main__":
    main()
