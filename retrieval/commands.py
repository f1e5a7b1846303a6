"""`lorahub-engine index build|query` and `retrieve`: the retrieval package's commands (entry-point plugins)."""

from __future__ import annotations

import argparse
import json
import sys

from lorahub_engine.cli.options import load_language_model
from lorahub_engine.compose import retrieve_and_compose
from lorahub_engine.errors import AdapterError
from lorahub_engine.zoo import AdapterZoo
from retrieval.embedder import TASK_PREFIX
from retrieval.config import IndexConfig
from retrieval.index import AdapterIndex


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
        model, tokenizer = load_language_model(args.model)
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
