"""MoLE settings on the mixed-task set: which gate (per token or per sequence, dense or top-4, steps, lr, balance
loss) routes a mixture of training tasks best on the tiny base (an ablation of bench_mixed_tasks' mole_mixture).

    HF_HUB_OFFLINE=1 python -m benchmarks.mixed_tasks_mole_settings [SETTING ...]   (default: all)

Every setting trains MoLE gates over the whole zoo on 8 train examples of each zoo task and scores the same 300
mixed inputs as bench_mixed_tasks; prints exact match and seconds per setting.
"""

from __future__ import annotations

import argparse
import time

import torch

import lorahub_engine as le
from benchmarks.bases import load_base
from benchmarks.bench_mixed_tasks import answers, mixed_set
from benchmarks.router_methods import mixture_pairs
from benchmarks.taskworld import accuracy
from benchmarks.taskworld_zoo import load_zoo
from lorahub_engine._io import write_json_atomic
from routers import MoLEConfig, attach_router, train_router

SETTINGS = {  # name -> (config, steps, lr)
    "seq_top4": (MoLEConfig(top_k=4, granularity="sequence"), 150, 1e-2),
    "seq_dense": (MoLEConfig(top_k=None, granularity="sequence"), 150, 1e-2),
    "tok_dense": (MoLEConfig(top_k=None), 150, 1e-2),
    "seq_top4_lr5e-2_300": (MoLEConfig(top_k=4, granularity="sequence", balance_weight=0.0), 300, 5e-2),
    "seq_dense_lr5e-2_300": (MoLEConfig(top_k=None, granularity="sequence", balance_weight=0.0), 300, 5e-2),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="*", help=f"settings to run (default: all of {', '.join(SETTINGS)})")
    parser.add_argument("--output", help="JSON file for the scores")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = load_base("tiny")
    zoo = load_zoo(base)
    items = mixed_set(zoo, 12, 25)
    truth = [y for _, _, y in items]
    pairs = mixture_pairs(base, zoo)
    scores = {}
    for name in args.settings or SETTINGS:
        config, steps, lr = SETTINGS[name]
        start = time.time()
        try:
            attach_router(base.model, config, list(zoo))
            with torch.enable_grad():
                train_router(base.model, base.tokenizer, pairs, steps=steps, lr=lr, seed=0, progress=False)
            with torch.no_grad():
                scores[name] = {"exact_match": accuracy(answers(base, items), truth), "seconds": time.time() - start}
        finally:
            le.detach(base.model)
        print(name, scores[name], flush=True)
    if args.output:
        write_json_atomic(args.output, scores)
    return scores


if __name__ == "__main__":
    main()
