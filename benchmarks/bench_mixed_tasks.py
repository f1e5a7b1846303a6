"""A mixed-task test set: inputs of many training tasks in one batch, each method answering all of them at once.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_mixed_tasks [--tasks 12] [--n-test 25]

Tasks: every 5th of the tiny zoo's training tasks; test inputs from their test splits, shuffled together. Methods:
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
import random
import tempfile
from pathlib import Path

import torch

import lorahub_engine as le
from benchmarks.bases import load_base
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
    """(task, input, answer) triples of n_tasks zoo tasks, shuffled (seed 0)."""
    tasks = zoo.names[::5][:n_tasks]
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--n-test", type=int, default=25)
    parser.add_argument("--output", default="benchmarks/results/bench_mixed_tasks.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = load_base("tiny")
    zoo = load_zoo(base)
    items = mixed_set(zoo, args.tasks, args.n_test)
    truth = [y for _, _, y in items]
    names, tasks = zoo.names, sorted({t for t, _, _ in items})
    scores = {}
    with torch.no_grad():
        scores["zero_shot"] = accuracy(answers(base, items), truth)
        with le.attached(base.model, list(zoo)):
            ids = torch.tensor([names.index(t) for t, _, _ in items])
            scores["oracle"] = accuracy(answers(base, items, lambda r: le.routing(base.model, ids[r])), truth)
            prompts = [format_prompt(get_task(t).instruction, x) for t, x, _ in items]
            hits = retrieve(load_zoo_index(base.name, zoo), prompts, 3)
            idx, gates = assignment(hits, names, 3)
            scores["retrieval_mixture"] = accuracy(
                answers(base, items, lambda r: le.routing(base.model, idx[r], gates[r])), truth)
        merges = {"merge_uniform_zoo": (names, "task_arithmetic", {}), "merge_uniform_set": (tasks, "task_arithmetic", {}),
                  "merge_ties_set": (tasks, "ties", {"density": 0.2})}
        for label, (chosen, method, options) in merges.items():
            weights = [1 / len(chosen)] * len(chosen) if method == "task_arithmetic" else [1.0] * len(chosen)
            adapter = le.merge([zoo[n] for n in chosen], weights, method, seed=0, name=label, **options)
            with le.attached(base.model, [adapter]):
                le.set_weights(base.model, [1.0])
                scores[label] = accuracy(answers(base, items), truth)
        scores["best_static"] = max(scores[label] for label in merges)
        attach_router(base.model, ArrowConfig(top_k=3), list(zoo))
        try:
            scores["arrow"] = accuracy(answers(base, items), truth)
        finally:
            le.detach(base.model)
    folder = train_mixture_router(base, zoo, Path(tempfile.mkdtemp(prefix="mole_mixture.")), progress=True)
    with torch.no_grad():
        load_router(base.model, folder, experts=list(zoo))
        try:
            scores["mole_mixture"] = accuracy(answers(base, items), truth)
        finally:
            le.detach(base.model)
    for method in ("sira", "loramoe"):
        folder = train_moe(base, zoo, method, Path(tempfile.mkdtemp(prefix=f"{method}_mixture.")) / "router",
                           progress=True)
        with torch.no_grad():
            load_router(base.model, folder)
            try:
                scores[method] = accuracy(answers(base, items), truth)
                stats = router_stats(base.model)
                experts = [f"expert{e}" for e in range(len(next(iter(stats.values()))["mean_gate"]))]
                plot_usage(stats, experts, str(Path(args.output).with_name(f"bench_mixed_tasks_{method}_usage.png")))
            finally:
                le.detach(base.model)
    with le.attached(base.model, [train_multitask_lora(base, zoo, progress=True)]), torch.no_grad():
        le.set_weights(base.model, [1.0])
        scores["multitask_lora"] = accuracy(answers(base, items), truth)
    gap = scores["oracle"] - scores["best_static"]
    closed = {m: (scores[m] - scores["best_static"]) / gap if gap else float("nan")
              for m in ("retrieval_mixture", "arrow", "mole_mixture", "sira", "loramoe", "multitask_lora")}
    result = {"config": vars(args), "tasks": tasks, "n_items": len(items), "exact_match": scores,
              "gap_closed": closed}
    write_json_atomic(args.output, result)
    for name, value in scores.items():
        print(f"{name:<20} {value:.3f}" + (f"   gap closed {closed[name]:+.2f}" if name in closed else ""))
    return result


if __name__ == "__main__":
    main()
