"""`merge` and `inspect`: commands on PEFT LoRA folders."""

from __future__ import annotations

import argparse
import json
import math

from lorahub_engine.adapter import LoraAdapter, LoraModule
from lorahub_engine.cli.options import floats
from lorahub_engine.merge import METHODS, merge
from lorahub_engine.merge.methods import KNOTS_INNER
from lorahub_engine.merge.registry import SPACES


def add_merge(commands) -> None:
    p = commands.add_parser("merge", help="merge adapters into one PEFT adapter folder",
                            description="Merge PEFT LoRA folders with a registered method (see le.merge).")
    p.add_argument("adapters", nargs="+", help="PEFT LoRA folders")
    p.add_argument("-o", "--output", required=True, help="folder to write the merged adapter to")
    p.add_argument("--method", default="task_arithmetic", choices=sorted(METHODS))
    p.add_argument("--weights", type=floats, help="one weight per adapter, comma-separated (default all 1)")
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
