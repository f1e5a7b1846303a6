"""`lorahub-engine route train|eval|stats|export`: the routers package's commands (an entry-point plugin of the core
CLI).

    lorahub-engine route train --method mole --zoo ZOO --model M --examples train.jsonl -o ROUTER
    lorahub-engine route train --method sira --num-experts 8 --top-k 2 --model M --examples train.jsonl -o ROUTER
    lorahub-engine route train --method loramoe --expert-groups 3,3 --model M --examples typed.jsonl -o ROUTER
    lorahub-engine route eval ROUTER [--zoo ZOO] --model M --examples test.jsonl     # --zoo: mole and arrow only
    lorahub-engine route stats ROUTER [--zoo ZOO] --model M --examples test.jsonl -o usage.png
    lorahub-engine route export ROUTER --model M -o EXPERTS     # sira / loramoe: each expert a PEFT folder (a zoo)
    torchrun --nproc-per-node 4 -m lorahub_engine.cli route train ...   # data-parallel; rank 0 writes and prints

Method options left out take the config's default (routers.config); one that does not apply to --method is an error.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import torch

import lorahub_engine as le
from lorahub_engine.cli.options import (add_overwrite, add_threads, check_output_path, load_language_model,
                                        positive_float, positive_int, read_examples, set_threads)
from lorahub_engine._io import save_figure
from lorahub_engine.fewshot import exact_match, example_losses, generate_answers
from lorahub_engine.progress import progress_bar
from lorahub_engine.search.objective import encode_pairs
from lorahub_engine.zoo import ZOO_FOLDER, AdapterZoo
from routers.api import attach_router, export_experts, reset_router_stats, router_stats
from routers.config import CONFIGS, GRANULARITIES
from routers.distributed import join
from routers.errors import RouterError
from routers.storage import ROUTER_FOLDER, load_router, save_router, saved_config, saved_experts
from routers.train import train_router


def positive_ints(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers."""
    return tuple(positive_int(part) for part in text.split(","))


def expert_counts(text: str) -> int | tuple[int, ...]:
    """argparse type: one positive integer, or one per layer (comma-separated)."""
    counts = positive_ints(text)
    return counts[0] if len(counts) == 1 and "," not in text else counts


def capacity(text: str) -> float | None:
    """argparse type: a positive number, or "none" (no capacity)."""
    return None if text.lower() == "none" else positive_float(text)


@dataclass(frozen=True)
class MethodOption:
    """A `route train` option that sets the config field of its name, for the methods listed."""

    flag: str
    methods: tuple[str, ...]
    help: str
    none: str = "none"  # how the help shows a default of None
    kwargs: dict = field(default_factory=dict)


OPTIONS = {
    "top_k": MethodOption("--top-k", ("mole", "arrow", "sira"), "experts per token", "all (dense)",
                          {"type": positive_int}),
    "temperature": MethodOption("--temperature", ("mole", "arrow"), "softmax temperature (MoLE: its initial value)",
                                kwargs={"type": positive_float}),
    "granularity": MethodOption("--granularity", ("mole",), "a gate per token or per sequence",
                                kwargs={"choices": GRANULARITIES}),
    "balance_weight": MethodOption("--balance-weight", ("mole", "loramoe"),
                                   "balance loss weight (LoRAMoE: beta of the localized balance)",
                                   kwargs={"type": float}),
    "num_experts": MethodOption("--num-experts", ("sira", "loramoe"),
                                "new experts per layer: N, or one N per layer (N0,N1,...)",
                                kwargs={"type": expert_counts}),
    "rank": MethodOption("--rank", ("sira", "loramoe"), "rank of each expert", kwargs={"type": positive_int}),
    "alpha": MethodOption("--alpha", ("sira", "loramoe"), "expert scale alpha / rank", kwargs={"type": positive_float}),
    "target_modules": MethodOption("--target-modules", ("sira", "loramoe"),
                                   "modules the experts wrap (names or path endings)",
                                   "every linear of the layer stack (the model family's attention and MLP)",
                                   {"nargs": "+", "metavar": "NAME"}),
    "capacity_factor": MethodOption("--capacity-factor", ("sira",),
                                    "per-expert capacity in training, ceil(F * tokens * top-k / experts) pairs per "
                                    "layer and batch ('none': no limit)", kwargs={"type": capacity}),
    "gate_dropout": MethodOption("--gate-dropout", ("sira",), "dropout on the gates, in training",
                                 kwargs={"type": float}),
    "aux_loss_weight": MethodOption("--aux-loss-weight", ("sira",), "Switch load-balancing loss weight",
                                    kwargs={"type": float}),
    "z_loss_weight": MethodOption("--z-loss-weight", ("sira",), "router z-loss weight", kwargs={"type": float}),
    "balance_delta": MethodOption("--balance-delta", ("loramoe",), "delta of the localized balance",
                                  kwargs={"type": float}),
    "expert_groups": MethodOption("--expert-groups", ("loramoe",),
                                  "expert group sizes in bank order, summing to --num-experts (e.g. 3,3); an "
                                  'example\'s "type" is its group index', "none (plain balance, types unused)",
                                  {"type": positive_ints}),
}


def add_route(commands) -> None:
    p = commands.add_parser("route", help="token-level routers (MoLE, Arrow, SiRA, LoRAMoE): train, eval, stats, "
                                          "export",
                            description="Per-token routing through the grouped op: learned (MoLE) or training-free "
                                        "(Arrow) over frozen zoo adapters, or over new experts that train with their "
                                        "routers (SiRA: sparse top-k with a capacity; LoRAMoE: dense, localized "
                                        "balance).")
    sub = p.add_subparsers(dest="route_command", required=True, metavar="ACTION")
    train = sub.add_parser("train", help="build a router (MoLE, SiRA, LoRAMoE: train it) and save it")
    train.add_argument("--method", required=True, choices=tuple(CONFIGS),
                       help="MoLE gates (trained) or Arrow (no training) over zoo adapters; SiRA or LoRAMoE: new "
                            "experts and their routers (trained, no zoo)")
    _add_inputs(train)
    train.add_argument("-o", "--output", required=True, help="router folder to write")
    train.add_argument("--adapters", nargs="+", metavar="NAME", help="mole, arrow: zoo adapters to route over "
                                                                    "(default: all)")
    for name, option in OPTIONS.items():
        train.add_argument(option.flag, dest=name, default=argparse.SUPPRESS, **option.kwargs,
                           help=f"{option.help} [{', '.join(option.methods)}; default: {_defaults(name, option)}]")
    train.add_argument("--steps", type=positive_int, default=300, help="training steps")
    train.add_argument("--lr", type=positive_float, default=5e-3,
                       help="learning rate of what trains (gates; sira, loramoe: routers and experts)")
    train.add_argument("--batch-size", type=positive_int, default=8, help="examples per step (per rank under torchrun)")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of the batches (sira, loramoe: also of the experts, routers and gate dropout)")
    add_overwrite(train)
    train.set_defaults(run=run_route_train)
    for name, run, text in (("eval", run_route_eval, "answer loss and exact match of a saved router"),
                            ("stats", run_route_stats, "expert usage per layer, as JSON and a PNG plot")):
        q = sub.add_parser(name, help=text)
        q.add_argument("router", help="router folder (from route train)")
        _add_inputs(q)
        q.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward")
        if name == "stats":
            q.add_argument("-o", "--output", required=True, help="PNG file of mean gate per layer and expert")
        q.add_argument("--json", action="store_true", help="print JSON")
        q.set_defaults(run=run)
    export = sub.add_parser("export", help="write the experts a sira or loramoe router trained as PEFT folders")
    export.add_argument("router", help="router folder (from route train --method sira or loramoe)")
    export.add_argument("--model", required=True, help="the transformers model folder the router was trained on")
    export.add_argument("-o", "--output", required=True,
                        help="folder to write: one PEFT adapter folder per expert (OUTPUT/expert0, ...) and a zoo "
                             "manifest")
    add_overwrite(export)
    add_threads(export)
    export.set_defaults(run=run_route_export)


def _defaults(name: str, option: MethodOption) -> str:
    values = [getattr(CONFIGS[method], name) for method in option.methods]
    shown = [option.none if v is None else ",".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in values]
    if len(set(shown)) == 1:
        return shown[0]
    return ", ".join(f"{method} {text}" for method, text in zip(option.methods, shown))


def _add_inputs(p) -> None:
    p.add_argument("--zoo", help="zoo folder (mole, arrow: the adapters routed over; sira and loramoe need none)")
    p.add_argument("--model", required=True, help="transformers model folder (causal or seq2seq LM)")
    p.add_argument("--examples", required=True,
                   help='JSON lines file, one {"input": ..., "output": ...} per line (train: an optional integer '
                        '"type", the expert group of LoRAMoE\'s localized balance)')
    add_threads(p)


def _train_config(args: argparse.Namespace):
    """The router config of `route train`'s options: the method's config with the options given (others keep their
    defaults); an option of another method, or --adapters for a method with its own experts, is a RouterError."""
    given = {name: getattr(args, name) for name in OPTIONS if hasattr(args, name)}
    wrong = [OPTIONS[name].flag for name in given if args.method not in OPTIONS[name].methods]
    if wrong:
        raise RouterError(f"{', '.join(wrong)}: not an option of --method {args.method} (see route train --help)")
    cls = CONFIGS[args.method]
    if cls.trains_experts and args.adapters:
        raise RouterError(f"--adapters: --method {args.method} trains new experts (set --num-experts); zoo adapters "
                          "are routed over by mole and arrow")
    return cls(**given, **({"seed": args.seed} if cls.trains_experts else {}))


def _zoo_experts(args: argparse.Namespace, config, names: list[str] | None) -> list[le.LoraAdapter] | None:
    """The zoo adapters (`names`, default all) a mole or arrow router routes over; None for sira and loramoe, whose
    experts are the router's own. --zoo given to one, or missing for the other, is a RouterError."""
    if config.trains_experts:
        if args.zoo is not None:
            raise RouterError(f"--zoo: a {config.method} router has its own experts (the router folder holds them); "
                              "drop --zoo")
        return None
    if args.zoo is None:
        raise RouterError(f"--zoo is required: a {config.method} router routes over zoo adapters")
    zoo = AdapterZoo.load(args.zoo, lazy=True)
    return [zoo[name] for name in names or zoo.names]


def run_route_train(args: argparse.Namespace) -> int:
    set_threads(args)
    config = _train_config(args)
    check_output_path(args.output, ROUTER_FOLDER, args.overwrite,
                      [p for p in (args.zoo, args.model, args.examples) if p])
    examples = read_examples(args.examples, types=True)
    experts = _zoo_experts(args, config, args.adapters)
    model, tokenizer = load_language_model(args.model)
    model = attach_router(model, config, experts)
    ranks = join()  # under torchrun: every rank trains its shard (--batch-size per rank), rank 0 writes
    if args.method != "arrow":
        history = train_router(model, tokenizer, examples, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                               seed=args.seed)
        if ranks.main:
            aux = "".join(f", {name} loss {values[-1]:.4f}" for name, values in history.aux.items())
            print(f"task loss {history.task[0]:.4f} -> {history.task[-1]:.4f} in {args.steps} steps{aux}")
    if ranks.main:
        save_router(model, args.output, overwrite=args.overwrite)
        print(f"wrote {args.output} ({args.method}, {len(le.attached_names(model))} experts)")
    return 0


def run_route_export(args: argparse.Namespace) -> int:
    set_threads(args)
    config = saved_config(args.router)
    if not config.trains_experts:
        raise RouterError(f"{args.router}: a {config.method} router routes over zoo adapters and trained none; route "
                          "export writes the experts of a sira or loramoe router")
    check_output_path(args.output, ZOO_FOLDER, args.overwrite, [args.router, args.model])
    model, _ = load_language_model(args.model)
    adapters = export_experts(load_router(model, args.router))
    AdapterZoo(adapters).save(args.output, overwrite=args.overwrite)  # whole or not at all
    print(f"wrote {args.output} ({len(adapters)} experts as PEFT folders: {', '.join(a.name for a in adapters)})")
    return 0


def _routed(args: argparse.Namespace):
    set_threads(args)
    experts = _zoo_experts(args, saved_config(args.router), saved_experts(args.router))
    examples = read_examples(args.examples)
    model, tokenizer = load_language_model(args.model)
    return load_router(model, args.router, experts=experts), tokenizer, examples


def _batches(examples, size):
    return [examples[i : i + size] for i in range(0, len(examples), size)]


@torch.no_grad()
def run_route_eval(args: argparse.Namespace) -> int:
    model, tokenizer, examples = _routed(args)
    losses, answers = [], []
    for chunk in progress_bar(_batches(examples, args.batch_size), desc="eval"):
        losses += example_losses(model, encode_pairs(model, tokenizer, chunk)).tolist()
        answers += generate_answers(model, tokenizer, [x for x, _ in chunk])
    exact = sum(exact_match(a, y) for a, (_, y) in zip(answers, examples)) / len(examples)
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
    grid = [stats[p]["mean_gate"] + [float("nan")] * (len(experts) - len(stats[p]["mean_gate"]))
            for p in layers]  # (layers, E): a layer with fewer experts (MoLA) blank on the others
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(experts), 1.0 + 0.22 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(experts)), experts, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_xlabel("expert")
    ax.set_title("mean gate per layer (real tokens)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
