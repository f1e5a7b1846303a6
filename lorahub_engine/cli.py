"""The `lorahub-engine` command line.

Each command is two functions: `add_<command>(commands)` declares its subparser and sets `run=run_<command>`;
`run_<command>(args)` does the work and returns the exit code. Register a new command by appending its `add_`
function to COMMANDS. Errors of the AdapterError family print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from lorahub_engine.adapter import LoraAdapter, LoraModule
from lorahub_engine.errors import AdapterError
from lorahub_engine.merge import METHODS, merge
from lorahub_engine.merge.methods import KNOTS_INNER
from lorahub_engine.merge.registry import SPACES


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except AdapterError as e:
        print(f"lorahub-engine {args.command}: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorahub-engine",
                                     description="Compose, retrieve, search and route LoRA adapters.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_merge(commands) -> None:
    p = commands.add_parser("merge", help="merge adapters into one PEFT adapter folder",
                            description="Merge PEFT LoRA folders with a registered method (see le.merge).")
    p.add_argument("adapters", nargs="+", help="PEFT LoRA folders")
    p.add_argument("-o", "--output", required=True, help="folder to write the merged adapter to")
    p.add_argument("--method", default="task_arithmetic", choices=sorted(METHODS))
    p.add_argument("--weights", type=_floats, help="one weight per adapter, comma-separated (default all 1)")
    p.add_argument("--density", type=float, help="fraction kept by ties / dare_* / magnitude_prune / knots")
    p.add_argument("--space", default="delta", choices=SPACES)
    p.add_argument("--rank", type=int, help="truncate every module to this rank (default: exact)")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops")
    p.add_argument("--name", help="name of the merged adapter")
    p.add_argument("--majority-sign-method", choices=("total", "frequency"))
    p.add_argument("--knots-method", choices=KNOTS_INNER)
    p.set_defaults(run=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    merged = merge(args.adapters, args.weights, args.method, density=args.density, space=args.space,
                   rank=args.rank, seed=args.seed, name=args.name, majority_sign_method=args.majority_sign_method,
                   knots_method=args.knots_method, progress=True)
    merged.save(args.output)
    ranks = sorted({m.rank for m in merged.modules.values()})
    print(f"{args.output}: {args.method} of {len(args.adapters)} adapters, {len(merged.modules)} modules, "
          f"rank {_span(ranks)}")
    return 0


def add_inspect(commands) -> None:
    p = commands.add_parser("inspect", help="summarize a PEFT LoRA folder",
                            description="Base model, modules, per-module rank / scale / shape and norms.")
    p.add_argument("adapter", help="PEFT LoRA folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_inspect)


def module_summary(path: str, lora: LoraModule) -> dict:
    """Rank, scale, shape and Frobenius norms; |dW| = |s| sqrt(sum((B^T B) * (A A^T))) avoids forming dW."""
    A, B = lora.A.double(), lora.B.double()
    return {"module": path, "rank": lora.rank, "scale": lora.scale, "out": B.shape[0], "in": A.shape[1],
            "norm_A": A.norm().item(), "norm_B": B.norm().item(),
            "norm_delta": abs(lora.scale) * math.sqrt(max(((B.T @ B) * (A @ A.T)).sum().item(), 0.0))}


def run_inspect(args: argparse.Namespace) -> int:
    adapter = LoraAdapter.load(args.adapter, lazy=True)
    rows = [module_summary(path, adapter.modules[path]) for path in adapter.modules]
    info = {"path": str(args.adapter), "name": adapter.name, "base_model": adapter.base_model,
            "task_type": adapter.task_type, "fan_in_fan_out": adapter.fan_in_fan_out,
            "metadata_keys": sorted(adapter.metadata), "modules": rows}
    print(json.dumps(info, indent=2) if args.json else _inspect_text(info))
    return 0


def _span(values: list) -> str:
    return str(values[0]) if len(set(values)) == 1 else f"{min(values)}..{max(values)}"


def _inspect_text(info: dict) -> str:
    rows = info["modules"]
    params = sum(r["rank"] * (r["in"] + r["out"]) for r in rows)
    total = math.sqrt(sum(r["norm_delta"] ** 2 for r in rows))
    width = max(len("module"), *(len(r["module"]) for r in rows))
    lines = [
        f"adapter:        {info['name']} ({info['path']})",
        f"base model:     {info['base_model']}",
        f"task type:      {info['task_type']}",
        f"fan_in_fan_out: {info['fan_in_fan_out']}",
        f"modules:        {len(rows)}, rank {_span([r['rank'] for r in rows])}, "
        f"scale {_span([round(r['scale'], 6) for r in rows])}, {params:,} parameters",
        f"metadata keys:  {', '.join(info['metadata_keys']) or '(none)'}",
        f"|dW|_F total:   {total:.4g}",
        "",
        f"{'module':<{width}}  {'rank':>4}  {'scale':>8}  {'out x in':^13}  {'|A|_F':>9}  {'|B|_F':>9}  {'|dW|_F':>9}",
    ]
    for r in rows:
        lines.append(f"{r['module']:<{width}}  {r['rank']:>4}  {r['scale']:>8.4g}  {r['out']:>5} x {r['in']:<5}"
                     f"  {r['norm_A']:>9.4g}  {r['norm_B']:>9.4g}  {r['norm_delta']:>9.4g}")
    return "\n".join(lines)


def add_index(commands) -> None:
    p = commands.add_parser("index", help="build or query a retrieval index over a zoo",
                            description="Index a zoo by the sentence embeddings of its adapters' sample inputs.")
    sub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = sub.add_parser("build", help="embed a zoo's sample inputs and write an index folder")
    build.add_argument("zoo", help="zoo folder (manifest.json with samples per adapter)")
    build.add_argument("-o", "--output", required=True, help="index folder to write")
    build.add_argument("--kind", default="auto", choices=("auto", "flat", "ivf", "hnsw"))
    build.add_argument("--embedder", help="sentence-transformers model folder (default: bundled all-MiniLM-L6-v2)")
    build.add_argument("--prefix", help="instruction prepended to every text")
    build.add_argument("--task-prefix", action="store_true", help="use LoRAretriever's retrieval instruction")
    for flag, help_text in [("--threshold", "auto: exact up to this many adapters"), ("--nlist", "IVF cells"),
                            ("--nprobe", "IVF cells visited per query"), ("--hnsw-m", "HNSW links per node"),
                            ("--ef-construction", "HNSW build beam"), ("--ef-search", "HNSW query beam")]:
        build.add_argument(flag, type=int, help=help_text)
    build.set_defaults(run=run_index_build)
    query = sub.add_parser("query", help="the best adapters for each text")
    query.add_argument("index", help="index folder")
    query.add_argument("texts", nargs="+", help="query texts")
    query.add_argument("-k", type=int, default=3)
    query.add_argument("--exclude", action="append", default=[], help="adapter name never returned (repeatable)")
    query.add_argument("--json", action="store_true", help="print JSON instead of a table")
    query.set_defaults(run=run_index_query)


def run_index_build(args: argparse.Namespace) -> int:
    from lorahub_engine.zoo import AdapterZoo
    from retrieval import TASK_PREFIX, AdapterIndex, IndexConfig

    tuning = {k: getattr(args, k) for k in ("threshold", "nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search")}
    prefix = TASK_PREFIX if args.task_prefix else args.prefix
    config = IndexConfig(kind=args.kind, embedder=args.embedder, prefix=prefix,
                         **{k: v for k, v in tuning.items() if v is not None})
    index = AdapterIndex.build(AdapterZoo.load(args.zoo, lazy=True), config=config, progress=True)
    index.save(args.output)
    print(f"{args.output}: {len(index)} adapters, {index.kind} index, dimension {index.dimension}, "
          f"embedder {index.embedder.name}")
    return 0


def run_index_query(args: argparse.Namespace) -> int:
    from retrieval import AdapterIndex

    hits = AdapterIndex.load(args.index).search(args.texts, k=args.k, exclude=args.exclude)
    if args.json:
        print(json.dumps([{"text": t, "hits": [[n, s] for n, s in row]} for t, row in zip(args.texts, hits)], indent=2))
        return 0
    for text, row in zip(args.texts, hits):
        print(text)
        for rank, (name, score) in enumerate(row, 1):
            print(f"  {rank}. {name}  {score:.4f}")
    return 0


def add_retrieve(commands) -> None:
    p = commands.add_parser("retrieve", help="retrieve adapters per input; with --model also compose and run",
                            description="Per input line: its k best adapters (JSON lines). With --model and --zoo, "
                                        "each batch runs once with every row's own adapters (le.retrieve_and_compose).")
    p.add_argument("index", help="index folder")
    p.add_argument("inputs", help="text file, one input per line")
    p.add_argument("-k", type=int, default=3)
    p.add_argument("-o", "--output", help="JSON lines file (default: stdout)")
    p.add_argument("--exclude", action="append", default=[], help="adapter name never used (repeatable)")
    p.add_argument("--model", help="transformers model folder (causal or seq2seq LM)")
    p.add_argument("--zoo", help="zoo folder whose adapters the index names (needed with --model)")
    p.add_argument("--mode", default="mixture", choices=("mixture", "fusion"))
    p.add_argument("--gating", default="uniform", choices=("uniform", "softmax"))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--options", help="comma-separated options to score instead of generating")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(run=run_retrieve)


def run_retrieve(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lorahub_engine.compose import retrieve_and_compose
    from lorahub_engine.zoo import AdapterZoo
    from retrieval import AdapterIndex

    if args.model and not args.zoo:
        raise AdapterError("--model needs --zoo (the adapters to attach)")
    try:
        inputs = [line.rstrip("\n") for line in open(args.inputs, encoding="utf-8") if line.strip()]
    except OSError as e:
        raise AdapterError(f"cannot read inputs: {e}") from None
    index = AdapterIndex.load(args.index)
    options = args.options.split(",") if args.options else None
    if not args.model:
        hits = index.search(inputs, k=args.k, exclude=args.exclude, progress=len(inputs) >= 100)
        records = [{"input": x, "adapters": [[n, s] for n, s in row]} for x, row in zip(inputs, hits)]
    else:
        model, tokenizer = _load_language_model(args.model)
        zoo = AdapterZoo.load(args.zoo)
        records = []
        for start in tqdm(range(0, len(inputs), args.batch_size), desc="retrieve and compose", unit="batch"):
            chunk = inputs[start : start + args.batch_size]
            out = retrieve_and_compose(model, tokenizer, zoo, index, chunk, k=args.k, mode=args.mode,
                                       gating=args.gating, temperature=args.temperature, options=options,
                                       max_new_tokens=args.max_new_tokens, exclude=args.exclude)
            records += [{"input": x, "adapters": [[n, s] for n, s in row], ("loglik" if options else "output"): y}
                        for x, row, y in zip(chunk, out.hits, out.outputs)]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(lines)
    else:
        sys.stdout.write(lines)
    return 0


def _load_language_model(path: str):
    """A local causal or seq2seq LM and its tokenizer, in eval mode (never downloads)."""
    import transformers as tf

    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
        cls = tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM
        return cls.from_pretrained(path, local_files_only=True).eval(), tf.AutoTokenizer.from_pretrained(
            path, local_files_only=True)
    except OSError as e:
        raise AdapterError(f"cannot load a model and tokenizer from {path}: {e}") from None


def add_search(commands) -> None:
    from lorahub_engine.search.config import DEFAULTS, MODES, STARTS

    p = commands.add_parser("search", help="LoraHub: search weights for N zoo adapters on a few examples",
                            description="Gradient-free search (nevergrad) of LoraHub weights for N adapters of a zoo "
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
                   help=f"'cma' or a nevergrad optimizer name (default {d.optimizer}; LoraHub's: NGOpt --start zero "
                        "--population 1)")
    p.add_argument("--population", type=int, default=d.population,
                   help="candidates per batched forward (default: the optimizer's own)")
    p.add_argument("--start", choices=STARTS, default=d.start, help=f"start point (default {d.start})")
    p.add_argument("--step", type=float, default=d.step, help=f"cma's initial step size (default {d.step})")
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help=f"fusion: LoraHub's factor mix; mixture: the exact sum of weighted deltas (default {d.mode})")
    p.add_argument("--folds", type=int, default=d.folds,
                   help=f"k-fold validation on the examples picking l1, budget or a fallback; 0 = off (default {d.folds})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, help="rows per forward (default: population x examples)")
    p.add_argument("--name", default="lorahub", help="name of the composed adapter")
    p.add_argument("--json", action="store_true", help="print the search result (with its history) as JSON")
    _add_threads(p)
    p.set_defaults(run=run_search)


def run_search(args: argparse.Namespace) -> int:
    from lorahub_engine.search import lorahub_search, random_modules, retrieved_modules
    from lorahub_engine.zoo import AdapterZoo

    _threads(args)
    examples = _read_examples(args.examples)
    zoo = AdapterZoo.load(args.zoo, lazy=True)
    if args.adapters:
        names = args.adapters
    elif args.random is not None:
        names = random_modules(zoo.names, args.random, seed=args.seed)
    else:
        from retrieval import AdapterIndex

        names = retrieved_modules(AdapterIndex.load(args.retrieve), [x for x, _ in examples], args.modules)
    adapters = [zoo[name] for name in names]
    model, tokenizer = _load_language_model(args.model)
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


def _read_examples(path: str) -> list[tuple[str, str]]:
    """(input, output) pairs from a JSON lines file; blank lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise AdapterError(f"cannot read examples: {e}") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            examples.append((record["input"], record["output"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise AdapterError(f'{path}:{number}: expected a JSON object with "input" and "output"') from None
    return examples


def _threads(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)


def _add_threads(p) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: tiny models gain nothing from more, and on a busy machine "
                        "OpenMP waits make small ops far slower)")


def add_build_zoo(commands) -> None:
    p = commands.add_parser("build-zoo", help="train one LoRA per taskworld training task (resumable, cached)",
                            description="Train the benchmark zoo through the engine (all adapters of a group "
                                        "jointly); cached in $LORAHUB_CACHE, resumable by group.")
    p.add_argument("--base", default="tiny", choices=("tiny", "smollm2"))
    p.add_argument("--out", help="also write the finished zoo to this folder (e.g. benchmarks/assets/tiny_zoo)")
    p.add_argument("--extra-tasks", action="append", default=[], help="module that registers more tasks")
    _add_threads(p)
    p.set_defaults(run=run_build_zoo)


def run_build_zoo(args: argparse.Namespace) -> int:
    from benchmarks.bases import load_base
    from benchmarks.taskworld import load_extra_tasks
    from benchmarks.zoo import build_zoo

    _threads(args)
    for module in args.extra_tasks:
        load_extra_tasks(module)
    folder = build_zoo(load_base(args.base), out=args.out)
    print(f"zoo: {folder}")
    return 0


def add_bench(commands) -> None:
    p = commands.add_parser("bench", help="benchmarks (cross-task: held-out tasks x composition methods)",
                            description="Run a benchmark; writes markdown, JSON and PNG results.")
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    cross = sub.add_parser("cross-task", help="held-out tasks x methods, 5 shots, mean +- std over seeds")
    cross.add_argument("--base", default="tiny", choices=("tiny", "smollm2"))
    cross.add_argument("--quick", action="store_true", help="a few tasks, 2 seeds, 30 test examples (CI)")
    cross.add_argument("--methods", nargs="+", help="registered method names (default: all)")
    cross.add_argument("--tasks", nargs="+", help="held-out task names (default: all held-out tasks)")
    cross.add_argument("--seeds", type=int, default=5, help="number of seeds (0..n-1)")
    cross.add_argument("--shots", type=int, default=5)
    cross.add_argument("--n-test", type=int, default=100)
    cross.add_argument("--k", type=int, default=3, help="adapters retrieved")
    cross.add_argument("--out", default="benchmarks/results", help="folder for the .md / .json / .png")
    cross.add_argument("--extra-tasks", action="append", default=[], help="module that registers more tasks")
    _add_threads(cross)
    cross.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from benchmarks import cross_task
    from benchmarks.bases import load_base
    from benchmarks.taskworld import load_extra_tasks

    _threads(args)
    for module in args.extra_tasks:
        load_extra_tasks(module)
    quick = cross_task.QUICK if args.quick else {}
    settings = cross_task.Settings(shots=args.shots, n_test=quick.get("n_test", args.n_test), k=args.k)
    seeds = list(range(quick.get("seeds", args.seeds)))
    tasks = args.tasks or quick.get("tasks")
    methods = args.methods or quick.get("methods")
    base = load_base(args.base)
    results = cross_task.run_cross_task(base, tasks, methods, seeds, settings=settings)
    stem = f"cross_task_{args.base}" + ("_quick" if args.quick else "")
    paths = cross_task.write_report(results, Path(args.out), args.base, settings, seeds, stem)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def add_demo(commands) -> None:
    p = commands.add_parser("demo", help="an unseen task, 5 examples: retrieved + composed adapters vs zero-shot",
                            description="Runs on the shipped tiny base and tiny zoo; nothing is downloaded.")
    p.add_argument("--task", help="a held-out taskworld task (default navigate)")
    p.add_argument("--methods", nargs="+", default=["uniform_retrieved", "retrieval_lorahub"],
                   help="compositions: uniform_retrieved, retrieval_lorahub, lorahub, retrieval_mixture, "
                   "retrieval_fusion, ties, best_single")
    p.add_argument("--k", type=int, default=3, help="adapters retrieved")
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="which 5 examples")
    _add_threads(p)
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from benchmarks.demo import run_demo as demo

    _threads(args)
    demo(args.task or None, tuple(args.methods), args.k, args.n_test, args.seed)
    return 0


COMMANDS = [add_merge, add_inspect, add_index, add_retrieve, add_search, add_build_zoo, add_bench, add_demo]

if __name__ == "__main__":
    sys.exit(main())
