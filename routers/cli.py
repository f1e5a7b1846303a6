"""`lorahub-engine route train|eval|stats`: the routers package's commands (an entry-point plugin of the core CLI).

    lorahub-engine route train --method mole --zoo ZOO --model M --examples train.jsonl -o ROUTER
    lorahub-engine route eval ROUTER --zoo ZOO --model M --examples test.jsonl
    lorahub-engine route stats ROUTER --zoo ZOO --model M --examples test.jsonl -o usage.png
    torchrun --nproc-per-node 4 -m lorahub_engine.cli route train ...   # data-parallel; rank 0 writes and prints
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from lorahub_engine.cli.options import add_threads, load_language_model, read_examples, set_threads
from lorahub_engine.fewshot import example_losses, generate_answers
from lorahub_engine.progress import progress_bar
from lorahub_engine.search.objective import encode_pairs
from lorahub_engine.zoo import AdapterZoo
from routers.api import attach_router, reset_router_stats, router_stats
from routers.config import ArrowConfig, MoLEConfig
from routers.distributed import join
from routers.storage import load_router, save_router, saved_experts
from routers.train import train_router


def add_route(commands) -> None:
    p = commands.add_parser("route", help="token-level routers over a zoo (MoLE, Arrow): train, eval, stats",
                            description="Learned (MoLE) or training-free (Arrow) per-token routing over frozen "
                                        "zoo adapters, through the grouped op.")
    sub = p.add_subparsers(dest="route_command", required=True, metavar="ACTION")
    train = sub.add_parser("train", help="build a router over zoo adapters (MoLE: train its gates) and save it")
    train.add_argument("--method", required=True, choices=("mole", "arrow"),
                       help="MoLE gates (trained) or Arrow (no training)")
    _add_inputs(train)
    train.add_argument("-o", "--output", required=True, help="router folder to write")
    train.add_argument("--adapters", nargs="+", metavar="NAME", help="zoo adapters to route over (default: all)")
    train.add_argument("--top-k", type=int, help="experts per token (MoLE default: all, dense; Arrow default: 3)")
    train.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (MoLE: initial)")
    train.add_argument("--granularity", default="token", choices=("token", "sequence"), help="MoLE gate per")
    train.add_argument("--balance-weight", type=float, default=0.5, help="MoLE balance loss weight (default 0.5)")
    train.add_argument("--steps", type=int, default=300, help="training steps")
    train.add_argument("--lr", type=float, default=5e-3, help="learning rate of the gates")
    train.add_argument("--batch-size", type=int, default=8, help="examples per step (per rank under torchrun)")
    train.add_argument("--seed", type=int, default=0, help="seed of the gates and the batches")
    train.set_defaults(run=run_route_train)
    for name, run, text in (("eval", run_route_eval, "answer loss and exact match of a saved router"),
                            ("stats", run_route_stats, "expert usage per layer, as JSON and a PNG plot")):
        q = sub.add_parser(name, help=text)
        q.add_argument("router", help="router folder (from route train)")
        _add_inputs(q)
        q.add_argument("--batch-size", type=int, default=8, help="examples per forward")
        if name == "stats":
            q.add_argument("-o", "--output", required=True, help="PNG file of mean gate per layer and expert")
        q.add_argument("--json", action="store_true", help="print JSON")
        q.set_defaults(run=run)


def _add_inputs(p) -> None:
    p.add_argument("--zoo", required=True, help="zoo folder")
    p.add_argument("--model", required=True, help="transformers model folder (causal or seq2seq LM)")
    p.add_argument("--examples", required=True, help='JSON lines file, one {"input": ..., "output": ...} per line')
    add_threads(p)


def run_route_train(args: argparse.Namespace) -> int:
    set_threads(args)
    zoo = AdapterZoo.load(args.zoo, lazy=True)
    experts = [zoo[name] for name in (args.adapters or zoo.names)]
    model, tokenizer = load_language_model(args.model)
    if args.method == "mole":
        config = MoLEConfig(top_k=args.top_k, granularity=args.granularity, temperature=args.temperature,
                            balance_weight=args.balance_weight)
    else:
        config = ArrowConfig(top_k=args.top_k or 3, temperature=args.temperature)
    model = attach_router(model, config, experts)
    ranks = join()  # under torchrun: every rank trains its shard (--batch-size per rank), rank 0 writes
    if args.method == "mole":
        history = train_router(model, tokenizer, read_examples(args.examples), steps=args.steps, lr=args.lr,
                               batch_size=args.batch_size, seed=args.seed)
        if ranks.main:
            print(f"task loss {history.task[0]:.4f} -> {history.task[-1]:.4f} in {args.steps} steps")
    if ranks.main:
        save_router(model, args.output)
        print(f"wrote {args.output} ({args.method}, {len(experts)} experts)")
    return 0


def _routed(args: argparse.Namespace):
    set_threads(args)
    zoo = AdapterZoo.load(args.zoo, lazy=True)
    model, tokenizer = load_language_model(args.model)
    model = load_router(model, args.router, experts=[zoo[name] for name in saved_experts(args.router)])
    return model, tokenizer, read_examples(args.examples)


def _batches(examples, size):
    return [examples[i : i + size] for i in range(0, len(examples), size)]


@torch.no_grad()
def run_route_eval(args: argparse.Namespace) -> int:
    model, tokenizer, examples = _routed(args)
    losses, answers = [], []
    for chunk in progress_bar(_batches(examples, args.batch_size), desc="eval"):
        losses += example_losses(model, encode_pairs(model, tokenizer, chunk)).tolist()
        answers += generate_answers(model, tokenizer, [x for x, _ in chunk])
    exact = sum(a == y.strip() for a, (_, y) in zip(answers, examples)) / len(examples)
    result = {"examples": len(examples), "loss": sum(losses) / len(losses), "exact_match": exact}
    print(json.dumps(result, indent=2) if args.json else
          f"{result['examples']} examples: answer loss {result['loss']:.4f}, exact match {exact:.3f}")
    return 0


@torch.no_grad()
def run_route_stats(args: argparse.Namespace) -> int:
    model, tokenizer, examples = _routed(args)
    reset_router_stats(model)
    for chunk in progress_bar(_batches(examples, args.batch_size), desc="stats"):
        batch = encode_pairs(model, tokenizer, chunk)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              **({"decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=batch.labels)}
                 if batch.is_seq2seq else {}))
    stats = router_stats(model)
    plot_usage(stats, saved_experts(args.router), args.output)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        for path, layer in stats.items():
            print(f"{path}: mean gate {' '.join(f'{g:.2f}' for g in layer['mean_gate'])}, "
                  f"entropy {layer['entropy']:.3f}")
    print(f"wrote {args.output}")
    return 0


def plot_usage(stats: dict, experts: list[str], path: str) -> None:
    """A heatmap of each layer's mean gate per expert (rows: layers in model order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(stats)
    grid = [stats[p]["mean_gate"] for p in layers]  # (layers, E)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(experts), 1.0 + 0.22 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(experts)), experts, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_xlabel("expert")
    ax.set_title("mean gate per layer (real tokens)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=Path(path).parent)  # complete under its name, or absent
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
