"""`search`: LoraHub weights for N zoo adapters on a few examples, written as a PEFT folder.

With `--retrieve INDEX` the adapters are those an index retrieves for the examples' inputs. The core does not import
the package that reads index folders: it loads the reader an upper package declares in the entry-point group
`lorahub_engine.indexes` (entry `default`: a class with `load(folder)` whose objects have `search(texts, k)`).
"""

from __future__ import annotations

import argparse
import json
from importlib.metadata import entry_points

from lorahub_engine.cli.options import add_threads, load_language_model, read_examples, set_threads
from lorahub_engine.errors import AdapterError

INDEXES_GROUP = "lorahub_engine.indexes"


def add_search(commands) -> None:
    from lorahub_engine.search.config import DEFAULTS, MODES, STARTS

    p = commands.add_parser("search", help="LoraHub: search weights for N zoo adapters on a few examples",
                            description="Gradient-free search (nevergrad or CMA-ES) of LoraHub weights for N adapters of a zoo "
                                        "on few-shot examples; writes the composed adapter as a PEFT folder.")
    p.add_argument("zoo", help="zoo folder")
    p.add_argument("--model", required=True, help="transformers model folder (causal or seq2seq LM)")
    p.add_argument("--examples", required=True, help='JSON lines file, one {"input": ..., "output": ...} per line')
    p.add_argument("-o", "--output", required=True, help="folder to write the composed adapter to")
    pick = p.add_mutually_exclusive_group(required=True)
    pick.add_argument("--adapters", nargs="+", metavar="NAME", help="zoo adapters to compose")
    pick.add_argument("--random", type=int, metavar="N", help="N adapters drawn at random (seeded by --seed)")
    pick.add_argument("--retrieve", metavar="INDEX", help="index folder: the adapters retrieved for the inputs")
    p.add_argument("--modules", type=int, default=20, help="adapters retrieved with --retrieve (default 20)")
    d = DEFAULTS
    p.add_argument("--budget", type=int, default=d.budget, help=f"objective evaluations (default {d.budget})")
    p.add_argument("--bound", type=float, default=d.bound, help=f"weights stay in [-bound, bound] (default {d.bound})")
    p.add_argument("--l1", type=float, default=d.l1, help=f"weight of mean |w| in the objective (default {d.l1})")
    p.add_argument("--optimizer", default=d.optimizer,
                   help=f"a nevergrad optimizer name or 'cma' (default {d.optimizer}, LoraHub's)")
    p.add_argument("--population", type=int, default=d.population,
                   help="candidates per batched forward (default: the optimizer's own; nevergrad 1)")
    p.add_argument("--start", choices=STARTS, default=d.start, help=f"start point (default {d.start})")
    p.add_argument("--step", type=float, default=d.step, help=f"cma's initial step size (default {d.step})")
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help=f"fusion: LoraHub's factor mix; mixture: the exact sum of weighted deltas (default {d.mode})")
    p.add_argument("--folds", type=int, default=d.folds,
                   help=f"k-fold validation on the examples picking l1, budget or a fallback; 0 = off (default {d.folds})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default {d.seed})")
    p.add_argument("--batch-size", type=int, help="rows per forward (default: population x examples)")
    p.add_argument("--name", default="lorahub", help="name of the composed adapter")
    p.add_argument("--json", action="store_true", help="print the search result (with its history) as JSON")
    add_threads(p)
    p.set_defaults(run=run_search)


def run_search(args: argparse.Namespace) -> int:
    from lorahub_engine.search import lorahub_search, random_modules, retrieved_modules
    from lorahub_engine.zoo import AdapterZoo

    set_threads(args)
    examples = read_examples(args.examples)
    zoo = AdapterZoo.load(args.zoo, lazy=True)
    if args.adapters:
        names = args.adapters
    elif args.random is not None:
        names = random_modules(zoo.names, args.random, seed=args.seed)
    else:
        names = retrieved_modules(load_index(args.retrieve), [x for x, _ in examples], args.modules)
    adapters = [zoo[name] for name in names]
    model, tokenizer = load_language_model(args.model)
    result = lorahub_search(model, tokenizer, adapters, examples, budget=args.budget, bound=args.bound, l1=args.l1,
                            optimizer=args.optimizer, population=args.population, start=args.start, step=args.step,
                            mode=args.mode, folds=args.folds, seed=args.seed, batch_size=args.batch_size)
    result.adapter(args.name).save(args.output)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    width = max(map(len, result.names))
    for name, weight in result.weights.items():
        print(f"{name:<{width}}  {weight:+.4f}")
    print(f"loss {result.loss:.4f} (cross-entropy {result.cross_entropy:.4f}) after {len(result.history)} evaluations")
    print(f"wrote {args.output}")
    return 0


def load_index(folder: str):
    """An index folder, read by the class declared as `default` in the entry-point group `lorahub_engine.indexes`."""
    found = entry_points(group=INDEXES_GROUP, name="default")
    if not found:
        raise AdapterError(f"no index reader is installed (entry point 'default' of group {INDEXES_GROUP})")
    return next(iter(found)).load().load(folder)
