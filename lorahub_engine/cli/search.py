"""`search`: LoraHub weights for N zoo adapters on a few examples, written as a PEFT folder.

With `--retrieve INDEX` the adapters are those an index retrieves for the examples' inputs. The core does not import
the package that reads index folders: it loads the reader an upper package declares in the entry-point group
`lorahub_engine.indexes` (entry `default`: a class with `load(folder)` whose objects have `search(texts, k)`).
"""

from __future__ import annotations

import argparse
import json
from importlib.metadata import entry_points

from lorahub_engine.adapter import ADAPTER_FOLDER
from lorahub_engine.cli.options import (
    add_overwrite,
    add_threads,
    check_output_path,
    positive_float,
    positive_int,
    load_language_model,
    read_examples,
    set_threads,
    show_progress,
)
from lorahub_engine.errors import AdapterError

INDEXES_GROUP = "lorahub_engine.indexes"


def add_search(commands) -> None:
    from lorahub_engine.search.config import DEFAULTS, MODES, STARTS, VALIDATIONS

    p = commands.add_parser("search", help="LoraHub: search weights for N zoo adapters on a few examples",
                            description="Search of LoraHub weights for N adapters of a zoo on few-shot examples (Adam "
                                        "through the grouped op by default; gradient-free: --optimizer NGOpt, "
                                        "LoraHub's, or cma); writes the composed adapter as a PEFT folder.")
    p.add_argument("zoo", help="zoo folder")
    p.add_argument("--model", required=True, help="transformers model folder (causal or seq2seq LM)")
    p.add_argument("--examples", required=True, help='JSON lines file, one {"input": ..., "output": ...} per line')
    p.add_argument("-o", "--output", required=True, help="folder to write the composed adapter to")
    pick = p.add_mutually_exclusive_group(required=True)
    pick.add_argument("--adapters", nargs="+", metavar="NAME", help="zoo adapters to compose")
    pick.add_argument("--random", type=positive_int, metavar="N", help="N adapters drawn at random (seeded by --seed)")
    pick.add_argument("--retrieve", metavar="INDEX", help="index folder: the adapters retrieved for the inputs")
    p.add_argument("--modules", type=positive_int, default=20, help="adapters retrieved with --retrieve")
    d = DEFAULTS
    p.add_argument("--budget", type=positive_int, default=d.budget, help="objective evaluations (an Adam step costs 3)")
    p.add_argument("--bound", type=positive_float, default=d.bound, help="weights stay in [-bound, bound]")
    p.add_argument("--l1", type=float, default=d.l1, help="weight of mean |w| in the objective")
    p.add_argument("--optimizer", default=d.optimizer,
                   help="a nevergrad optimizer name, 'cma', or 'adam' (gradient descent) (NGOpt: LoraHub's)")
    p.add_argument("--population", type=positive_int, default=d.population,
                   help="candidates per batched forward (None: the optimizer's own; nevergrad 1)")
    p.add_argument("--start", choices=STARTS, default=d.start, help="start point")
    p.add_argument("--step", type=positive_float, default=d.step, help="cma's initial step size")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="adam's learning rate")
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help="fusion: LoraHub's factor mix; mixture: the exact sum of weighted deltas")
    p.add_argument("--folds", type=int, default=d.folds,
                   help="k-fold validation on the examples picking l1, budget or a fallback; 0 = off")
    p.add_argument("--validate", choices=VALIDATIONS, default=d.validate,
                   help="with --folds, rank by held-out exact match of the greedy answers, ties going to w = 0 "
                        "(exact_match_fallback), or to the lower held-out CE (exact_match), or by CE alone")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the optimizer and of --random")
    p.add_argument("--batch-size", type=positive_int, help="rows per forward (None: population x examples)")
    p.add_argument("--name", default="lorahub", help="name of the composed adapter")
    p.add_argument("--json", action="store_true", help="print the search result (with its history) as JSON")
    add_overwrite(p)
    add_threads(p)
    p.set_defaults(run=run_search)


def run_search(args: argparse.Namespace) -> int:
    from lorahub_engine.search import lorahub_search, random_modules, retrieved_modules
    from lorahub_engine.search.config import GRADIENT
    from lorahub_engine.zoo import AdapterZoo

    set_threads(args)
    check_output_path(args.output, ADAPTER_FOLDER, args.overwrite, [args.zoo, args.model])
    examples = read_examples(args.examples)
    zoo = AdapterZoo.load(args.zoo, lazy=True)
    if args.adapters:
        names = args.adapters
    elif args.random is not None:
        names = random_modules(zoo.names, args.random, seed=args.seed)
    else:
        names = retrieved_modules(load_index(args.retrieve), [x for x, _ in examples], args.modules)
    adapters = [zoo[name] for name in names]
    _check_search_options(args, len(adapters))
    model, tokenizer = load_language_model(args.model)
    result = lorahub_search(model, tokenizer, adapters, examples, budget=args.budget, bound=args.bound, l1=args.l1,
                            optimizer=args.optimizer, population=args.population, start=args.start, step=args.step,
                            mode=args.mode, folds=args.folds, validate=args.validate, seed=args.seed,
                            batch_size=args.batch_size, lr=args.lr, progress=show_progress())
    result.adapter(args.name).save(args.output, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    width = max(map(len, result.names))
    for name, weight in result.weights.items():
        print(f"{name:<{width}}  {weight:+.4f}")
    unit = "Adam steps" if result.config.optimizer == GRADIENT else "evaluations"
    print(f"loss {result.loss:.4f} (cross-entropy {result.cross_entropy:.4f}) after {len(result.history)} {unit}")
    print(f"wrote {args.output}")
    return 0


def _check_search_options(args: argparse.Namespace, n: int) -> None:
    """The search's options, validated (an optimizer built and dropped) before any model loads."""
    from lorahub_engine.search.config import SearchConfig
    from lorahub_engine.search.loop import check_search

    config = SearchConfig(budget=args.budget, bound=args.bound, l1=args.l1, optimizer=args.optimizer,
                          population=args.population, start=args.start, step=args.step, mode=args.mode,
                          folds=args.folds, validate=args.validate, seed=args.seed, batch_size=args.batch_size,
                          lr=args.lr)
    check_search(config, n)


def load_index(folder: str):
    """An index folder, read by the class declared as `default` in the entry-point group `lorahub_engine.indexes`."""
    found = entry_points(group=INDEXES_GROUP, name="default")
    if not found:
        raise AdapterError(f"no index reader is installed (entry point 'default' of group {INDEXES_GROUP})")
    return next(iter(found)).load().load(folder)
