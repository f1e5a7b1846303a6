"""Does every zoo adapter learn its task? Base zero-shot, base 5-shot ICL and the task's adapter, per zoo task.

    python -m benchmarks.zoo_table --base smollm2            # needs the built zoo; resumable per task
    python -m benchmarks.zoo_table --base smollm2 --zoo benchmarks/assets/smollm2_zoo_groups/000  # a group so far

Each task is scored on its first `--n` distinct test examples (normalized exact match, as the cross-task
benchmark); ICL reads the 5 shots `examples(task, "fewshot", 5, seed=0)`. Every finished task is written at once to
`<out>/zoo_table_<base>.json` with its adapter's digest, so a rerun skips it, and rescores only the adapter column
where the adapter changed (a rebuilt zoo; rows written before digests were recorded are rescored when named in
`--rescore-adapter`); the markdown table goes to stdout and `<out>/zoo_table_<base>.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lorahub_engine.progress import progress_bar
import lorahub_engine as le
from benchmarks.bases import BASES, load_base
from benchmarks.cross_task import test_set
from benchmarks.runs import zoo_digest
from benchmarks.taskworld import accuracy, examples, get_task
from benchmarks.taskworld_zoo import load_zoo, require_zoo
from lorahub_engine._io import write_json_atomic, write_text_atomic
from lorahub_engine.fewshot import generate_answers

COLUMNS = ("zero_shot", "icl", "adapter")


def score_task(base, adapter: le.LoraAdapter, task_name: str, n: int, shots: int = 5, batch_size: int = 50,
               max_new_tokens: int = 24, base_row: dict | None = None) -> dict:
    """Accuracy of the base zero-shot, with `shots` in context, and with `adapter` attached, plus examples; with
    `base_row` (this task's row scored before, same n) its zero-shot and ICL columns are kept, not rescored."""
    task = get_task(task_name)
    test = test_set(task, n)
    shot_pairs = [tuple(e) for e in examples(task, "fewshot", shots, seed=0)]
    answers = [y for _, y in test]

    def run(prompts: list[str], routed: bool) -> list[str]:
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            if routed:
                with le.routing(base.model, torch.zeros(len(chunk), 1, dtype=torch.long)):
                    out += generate_answers(base.model, base.tokenizer, chunk, max_new_tokens)
            else:
                out += generate_answers(base.model, base.tokenizer, chunk, max_new_tokens)
        return out

    zero = [base.prompt(task.instruction, x) for x, _ in test]
    le.attach(base.model, [adapter])
    try:
        predictions = {"adapter": run(zero, True)}
    finally:
        le.detach(base.model)
    row = {"adapter": accuracy(predictions["adapter"], answers), "n_test": len(test),
           "adapter_digest": zoo_digest([adapter])}
    if base_row is None:
        predictions.update(zero_shot=run(zero, False),
                           icl=run([base.prompt(task.instruction, x, shot_pairs) for x, _ in test], False))
        row.update({c: accuracy(predictions[c], answers) for c in ("zero_shot", "icl")})
        shown = [{c: predictions[c][i] for c in COLUMNS} for i in range(min(3, len(test)))]
    else:
        row.update(zero_shot=base_row["zero_shot"], icl=base_row["icl"])
        shown = [{**{c: e[c] for c in ("zero_shot", "icl")}, "adapter": predictions["adapter"][i]}
                 for i, e in enumerate(base_row["examples"])]
    row["examples"] = [{"input": x, "answer": y, **shown[i]} for i, (x, y) in enumerate(test[:len(shown)])]
    return row


def markdown(rows: dict) -> str:
    lines = ["| task | family | n | zero-shot | 5-shot ICL | adapter | adapter beats zero-shot |", "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        beats = "yes" if row["adapter"] > row["zero_shot"] else "**NO**"
        lines.append(f"| {name} | {get_task(name).family} | {row['n_test']} | {row['zero_shot']:.2f} | "
                     f"{row['icl']:.2f} | {row['adapter']:.2f} | {beats} |")
    means = {c: statistics.fmean(r[c] for r in rows.values()) for c in COLUMNS}
    lines.append(f"| **mean** | | | **{means['zero_shot']:.3f}** | **{means['icl']:.3f}** | "
                 f"**{means['adapter']:.3f}** | {sum(r['adapter'] > r['zero_shot'] for r in rows.values())}"
                 f"/{len(rows)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo_table", description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2", choices=BASES)
    parser.add_argument("--n", type=int, default=50, help="test examples per task")
    parser.add_argument("--tasks", nargs="+", help="default: every task of the zoo")
    parser.add_argument("--zoo", help="a zoo folder to score instead of the base's built zoo (e.g. one finished "
                                      "group of a build); its rows join the same table")
    parser.add_argument("--rescore-adapter", nargs="+", default=[], metavar="TASK",
                        help="tasks whose adapter column is rescored (zero-shot and ICL kept) though their row records "
                             "no adapter digest")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.zoo is None:
        require_zoo(args.base)
    base = load_base(args.base)
    zoo = load_zoo(base) if args.zoo is None else le.AdapterZoo.load(args.zoo)
    path = Path(args.out) / f"zoo_table_{args.base}.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    rows = {name: row for name, row in done.get("tasks", {}).items() if row.get("n_test") and done.get("n") == args.n}
    for name in progress_bar(args.tasks or zoo.names, desc="zoo table", unit="task"):
        kept = rows.get(name)
        if kept is not None and name not in args.rescore_adapter and kept.get("adapter_digest") in (
                None, zoo_digest([zoo[name]])):
            continue
        start = time.time()
        rows[name] = score_task(base, zoo[name], name, args.n, base_row=kept)
        rows[name]["seconds"] = round(time.time() - start, 1)
        write_json_atomic(path, {"base": args.base, "n": args.n, "tasks": rows})
    table = markdown(rows)  # every task scored so far, this zoo's and earlier ones'
    print(table)
    write_text_atomic(path.with_suffix(".md"), table + "\n")


if __name__ == "__main__":
    main()
