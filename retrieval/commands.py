"""`lorahub-engine index build|query` and `retrieve`: the retrieval package's commands (entry-point plugins)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorahub_engine._io import OutputKind, write_text_atomic
from lorahub_engine.cli.options import (
    add_overwrite,
    check_output_path,
    load_language_model,
    positive_float,
    positive_int,
    read_lines,
    show_progress,
)
from lorahub_engine.compose import retrieve_and_compose
from lorahub_engine.errors import AdapterError
from lorahub_engine.progress import progress_bar
from lorahub_engine.zoo import AdapterZoo
from retrieval.embedder import TASK_PREFIX
from retrieval.config import IndexConfig
from retrieval.index import INDEX_FOLDER, AdapterIndex


def read_inputs(path: str, form: str = "auto") -> list[str]:
    """Inputs from a text file (one per non-blank line) or JSON lines (a string or {"input": ...} per line)."""
    lines = read_lines(path, "inputs")
    if form == "lines" or (form == "auto" and Path(path).suffix not in (".jsonl", ".ndjson")):
        return [line for line in lines if line.strip()]
    inputs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        text = record.get("input") if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise AdapterError(f'{path}:{number}: expected a JSON string or an object with an "input" string')
        inputs.append(text)
    return inputs


def _is_retrieve_output(path) -> bool:
    """A JSON lines file whose every line is a record this command writes (input and adapters)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return bool(lines) and all({"input", "adapters"} <= set(json.loads(line)) for line in lines)
    except (OSError, ValueError, TypeError):
        return False


RETRIEVE_OUTPUT = OutputKind("a retrieve output (JSON lines)", _is_retrieve_output, folder=False)


def add_index(commands) -> None:
    p = commands.add_parser("index", help="build or query a retrieval index over a zoo",
                            description="Index a zoo by the sentence embeddings of its adapters' sample inputs.")
    sub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = sub.add_parser("build", help="embed a zoo's sample inputs and write an index folder")
    build.add_argument("zoo", help="zoo folder (manifest.json with samples per adapter)")
    build.add_argument("-o", "--output", required=True, help="index folder to write")
    build.add_argument("--kind", default="auto", choices=("auto", "flat", "ivf", "hnsw"),
                       help="flat: exact; ivf / hnsw: approximate; auto: flat up to --threshold adapters")
    build.add_argument("--embedder", help="sentence-transformers model folder (None: bundled all-MiniLM-L6-v2)")
    build.add_argument("--prefix", help="instruction prepended to every text")
    build.add_argument("--task-prefix", action="store_true", help="use LoRAretriever's retrieval instruction")
    for flag, help_text in [("--threshold", "auto: exact up to this many adapters"), ("--nlist", "IVF cells"),
                            ("--nprobe", "IVF cells visited per query"), ("--hnsw-m", "HNSW links per node"),
                            ("--ef-construction", "HNSW build beam"), ("--ef-search", "HNSW query beam")]:
        build.add_argument(flag, type=positive_int, help=help_text + " (None: IndexConfig's default)")
    add_overwrite(build)
    build.set_defaults(run=run_index_build)
    query = sub.add_parser("query", help="the best adapters for each text")
    query.add_argument("index", help="index folder")
    query.add_argument("texts", nargs="+", help="query texts")
    query.add_argument("-k", type=positive_int, default=3, help="adapters per text")
    query.add_argument("--exclude", action="append", default=[], help="adapter name never returned (repeatable)")
    query.add_argument("--json", action="store_true", help="print JSON instead of a table")
    query.set_defaults(run=run_index_query)


def run_index_build(args: argparse.Namespace) -> int:
    check_output_path(args.output, INDEX_FOLDER, args.overwrite, [args.zoo])
    tuning = {k: getattr(args, k) for k in ("threshold", "nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search")}
    prefix = TASK_PREFIX if args.task_prefix else args.prefix
    config = IndexConfig(kind=args.kind, embedder=args.embedder, prefix=prefix,
                         **{k: v for k, v in tuning.items() if v is not None})
    index = AdapterIndex.build(AdapterZoo.load(args.zoo, lazy=True), config=config, progress=show_progress())
    index.save(args.output, overwrite=args.overwrite)
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
    p.add_argument("inputs", help="inputs: a text file, one input per line, or JSON lines (.jsonl: per line a "
                                   'JSON string or {"input": ...}, so an input may hold newlines)')
    p.add_argument("--format", default="auto", choices=("auto", "lines", "jsonl"),
                   help="how to read INPUTS; auto: jsonl for a .jsonl / .ndjson file, else lines")
    p.add_argument("-k", type=positive_int, default=3, help="adapters per input")
    p.add_argument("-o", "--output", help="JSON lines file (None: stdout)")
    p.add_argument("--exclude", action="append", default=[], help="adapter name never used (repeatable)")
    p.add_argument("--model", help="transformers model folder (causal or seq2seq LM)")
    p.add_argument("--zoo", help="zoo folder whose adapters the index names (needed with --model)")
    p.add_argument("--mode", default="mixture", choices=("mixture", "fusion"),
                   help="mixture: average the adapters' outputs; fusion: average their factors")
    p.add_argument("--gating", default="uniform", choices=("uniform", "softmax"),
                   help="weights of an input's k adapters: equal, or a softmax of retrieval scores")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="softmax gating temperature")
    p.add_argument("--options", help="comma-separated options to score instead of generating")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, help="tokens generated per input")
    p.add_argument("--batch-size", type=positive_int, default=16, help="inputs per forward")
    add_overwrite(p)
    p.set_defaults(run=run_retrieve)


def run_retrieve(args: argparse.Namespace) -> int:
    if args.model and not args.zoo:
        raise AdapterError("--model needs --zoo (the adapters to attach)")
    if args.output:
        check_output_path(args.output, RETRIEVE_OUTPUT, args.overwrite, [args.index, args.inputs])
    inputs = read_inputs(args.inputs, args.format)
    index = AdapterIndex.load(args.index)
    options = args.options.split(",") if args.options else None
    if not args.model:
        hits = index.search(inputs, k=args.k, exclude=args.exclude, progress=show_progress() and len(inputs) >= 100)
        records = [{"input": x, "adapters": [[n, s] for n, s in row]} for x, row in zip(inputs, hits)]
    else:
        model, tokenizer = load_language_model(args.model)
        zoo = AdapterZoo.load(args.zoo)
        records = []
        for start in progress_bar(range(0, len(inputs), args.batch_size), desc="retrieve and compose", unit="batch"):
            chunk = inputs[start : start + args.batch_size]
            out = retrieve_and_compose(model, tokenizer, zoo, index, chunk, k=args.k, mode=args.mode,
                                       gating=args.gating, temperature=args.temperature, options=options,
                                       max_new_tokens=args.max_new_tokens, exclude=args.exclude)
            records += [{"input": x, "adapters": [[n, s] for n, s in row], ("loglik" if options else "output"): y}
                        for x, row, y in zip(chunk, out.hits, out.outputs)]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if args.output:
        write_text_atomic(args.output, lines, RETRIEVE_OUTPUT, args.overwrite)
    else:
        sys.stdout.write(lines)
    return 0
