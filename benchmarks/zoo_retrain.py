"""Does a zoo task's adapter learn with another spec? Train it alone with the recipe's shared spec (`recipe.train`,
not a task's own `task_train` spec), fields changed, and score it as the zoo table does (zero-shot, 5-shot ICL, the
adapter on the task's first --n distinct test inputs).

    python -m benchmarks.zoo_retrain phrase_from_zorbish --set steps=320            # the recipe's rank 4, 4x steps
    python -m benchmarks.zoo_retrain phrase_from_zorbish --set steps=320 r=16 alpha=32

Prints the row and the training loss averaged over every 20 steps; nothing is written into the zoo.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from benchmarks.bases import BASES, load_base
from benchmarks.taskworld_zoo import default_recipe, train_task_adapters
from benchmarks.zoo_table import score_task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo_retrain", description=__doc__.splitlines()[0])
    parser.add_argument("task")
    parser.add_argument("--base", default="smollm2", choices=BASES)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="TrainSpec fields changed")
    parser.add_argument("--n", type=int, default=30, help="test examples")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_base(args.base)
    spec = default_recipe(base).train
    changes = {k: type(getattr(spec, k))(v) for k, v in (item.split("=", 1) for item in args.set)}
    spec = dataclasses.replace(spec, **changes)
    start = time.time()
    (adapter,), losses = train_task_adapters(base, [args.task], spec, progress=True)
    row = score_task(base, adapter, args.task, args.n)
    chunks = (losses[i:i + 20] for i in range(0, len(losses), 20))
    row["losses_every_20"] = [round(sum(chunk) / len(chunk), 3) for chunk in chunks]
    row["seconds"] = round(time.time() - start)
    print(json.dumps({"task": args.task, "changes": changes, **row}, indent=1))


if __name__ == "__main__":
    main()
