"""Time and peak memory of le.merge on 8 adapters of a 7B-shaped config, against PEFT's add_weighted_adapter.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_merge [--workdir DIR] [--adapters 8] [--layers 32]
        [--ties-layers 1] [--peft-layers 2] [--hidden 4096] [--threads N] [--out PATH]

Adapters: Llama-7B attention shapes (hidden 4096, 32 heads, no GQA), LoRA r=16, alpha 32 on q, k, v, o of every
layer: 128 modules, 64 MiB (fp32) per adapter, generated on disk in --workdir (reused when present).
Each case runs in a fresh subprocess; it reports the wall time of load + merge + save and its peak RSS
(ru_maxrss), plus its RSS just before the timed part (after imports; for PEFT, after building the base model).
Cases:
  ours       task_arithmetic rank 16 and cat (exact, rank 128) over all layers, from the folders (lazy);
             ties (delta space, density 0.2, rank 16) on the first --ties-layers layers: every module is a dense
             4096 x 4096 TIES of 8 dW, so its cost is per module; the full-model time is extrapolated (x modules);
             task_arithmetic rank 16 and cat on the --peft-layers subset, to compare with PEFT on equal work.
  PEFT       add_weighted_adapter svd (svd_rank 16, a dense SVD per module) and cat on a random Llama with
             --peft-layers 7B-shaped layers (intermediate 11008, vocab 1024): PEFT needs the base model in
             memory (0.8 GB per layer in fp32; the whole 32-layer 7B is 27 GB, more than this machine has).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.timing import run_info
from lorahub_engine.adapter import LoraAdapter, LoraModule
from lorahub_engine._io import write_json_atomic
from lorahub_engine.progress import progress_bar

RANK, ALPHA, TARGETS = 16, 32, ("q_proj", "k_proj", "v_proj", "o_proj")
BASE_ID = "bench/llama-7b-shaped"


def module_paths(layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.{t}" for i in range(layers) for t in TARGETS]


def generate(workdir: Path, n: int, layers: int, hidden: int) -> list[Path]:
    """n random adapters of the 7B-shaped config, as PEFT folders; kept across runs."""
    folders = [workdir / f"hidden{hidden}" / f"adapter{i}" for i in range(n)]
    for i, folder in enumerate(progress_bar(folders, desc="generate adapters", unit="adapter")):
        if (folder / "adapter_model.safetensors").is_file() and len(LoraAdapter.load(folder, lazy=True).modules) \
                == layers * len(TARGETS):
            continue
        g = torch.Generator().manual_seed(i)
        modules = {p: LoraModule(torch.randn(RANK, hidden, generator=g) / hidden**0.5,
                                 torch.randn(hidden, RANK, generator=g) / RANK**0.5, ALPHA / RANK)
                   for p in module_paths(layers)}
        LoraAdapter(folder.name, modules, base_model=BASE_ID, task_type="CAUSAL_LM").save(folder)
    return folders


def subset(folders: list[Path], layers: int) -> list[Path]:
    """The same adapters restricted to their first `layers` layers (what PEFT's smaller base model can take)."""
    out = []
    for folder in folders:
        target = folder.parent / f"layers{layers}" / folder.name
        if not target.is_dir():
            full = LoraAdapter.load(folder, lazy=True)
            full.with_modules({p: full.modules[p] for p in module_paths(layers)}).save(target)
        out.append(target)
    return out


def weights(n: int) -> list[float]:
    return [round(1.0 - 0.1 * i, 2) for i in range(n)]


# ---------------------------------------------------------------- child processes


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def child_ours(spec: dict) -> dict:
    import lorahub_engine as le

    before = rss_mb()
    start = time.perf_counter()
    merged = le.merge(spec["folders"], weights(len(spec["folders"])), spec["method"], rank=spec["rank"],
                      density=spec.get("density"), progress=True)
    merged.save(spec["output"])
    ranks = sorted({m.rank for m in merged.modules.values()})
    return {"seconds": time.perf_counter() - start, "rss_before_mb": before, "modules": len(merged.modules),
            "ranks": ranks}


def child_peft(spec: dict) -> dict:
    import transformers as tf
    from peft import PeftModel

    layers = spec["layers"]
    config = tf.LlamaConfig(hidden_size=spec["hidden"], intermediate_size=spec["hidden"] * 11008 // 4096, num_hidden_layers=layers,
                            num_attention_heads=32, num_key_value_heads=32, vocab_size=1024,
                            max_position_embeddings=128)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    before = rss_mb()
    start = time.perf_counter()
    names = [f"a{i}" for i in range(len(spec["folders"]))]
    model = PeftModel.from_pretrained(model, spec["folders"][0], adapter_name=names[0])
    for name, folder in zip(names[1:], spec["folders"][1:]):
        model.load_adapter(folder, adapter_name=name)
    loaded = time.perf_counter()
    extra = {"svd_rank": spec["rank"]} if spec["method"] == "svd" else {}
    model.add_weighted_adapter(names, weights(len(names)), "merged", combination_type=spec["method"], **extra)
    merged = time.perf_counter()
    model.save_pretrained(spec["output"], selected_adapters=["merged"])
    return {"seconds": time.perf_counter() - start, "merge_seconds": merged - loaded, "rss_before_mb": before,
            "modules": layers * len(TARGETS)}


def run_child(spec: dict) -> dict:
    """Run one case in a fresh interpreter; its peak RSS is ru_maxrss of that process alone."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_merge", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(spec: dict) -> None:
    result = child_ours(spec) if spec["kind"] == "ours" else child_peft(spec)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(result))


# ---------------------------------------------------------------- driver


def cases(full: list[Path], ties: list[Path], peft: list[Path], args, out: Path) -> list[dict]:
    L = args.peft_layers
    specs = [
        {"name": "ours task_arithmetic r16 (all layers)", "kind": "ours", "folders": full, "method": "task_arithmetic",
         "rank": RANK},
        {"name": "ours cat exact (all layers)", "kind": "ours", "folders": full, "method": "cat", "rank": None},
        {"name": f"ours ties delta r16 ({args.ties_layers} layers)", "kind": "ours", "folders": ties,
         "method": "ties", "rank": RANK, "density": 0.2},
        {"name": f"ours task_arithmetic r16 ({L} layers)", "kind": "ours", "folders": peft,
         "method": "task_arithmetic", "rank": RANK, "layers": L},
        {"name": f"ours cat exact ({L} layers)", "kind": "ours", "folders": peft, "method": "cat", "rank": None,
         "layers": L},
        {"name": f"PEFT svd r16 ({L} layers)", "kind": "peft", "folders": peft, "method": "svd", "rank": RANK,
         "layers": L},
        {"name": f"PEFT cat ({L} layers)", "kind": "peft", "folders": peft, "method": "cat", "rank": None, "layers": L},
    ]
    for i, spec in enumerate(specs):
        spec["hidden"], spec["threads"] = args.hidden, args.threads
        spec["folders"] = [str(f) for f in spec["folders"]]
        spec["output"] = str(out / f"case{i}")
    return specs


def ratios(results: dict, args) -> dict:
    return {label: {"time_speedup": results[b]["seconds"] / results[a]["seconds"],
                    "peak_rss_ratio": results[b]["peak_rss_mb"] / results[a]["peak_rss_mb"]}
            for label, (a, b) in _pairs(args).items()}


PARITY_TOL = 1e-4  # max |dW ours - dW PEFT| relative to PEFT's largest entry: fp32 rounding, not a different merge


def merged_folder(output: str | Path) -> Path:
    """The PEFT folder a case wrote: PEFT saves an adapter not named "default" in a subfolder of its name."""
    output = Path(output)
    return output if (output / "adapter_config.json").is_file() else output / "merged"


def parity(ours: str | Path, peft: str | Path) -> float:
    """max |dW_ours - dW_PEFT| / max |dW_PEFT| over every module of two merged adapters (same module set)."""
    a, b = LoraAdapter.load(merged_folder(ours), lazy=True), LoraAdapter.load(merged_folder(peft), lazy=True)
    if sorted(a.modules) != sorted(b.modules):
        raise RuntimeError(f"merged modules differ: {sorted(set(a.modules) ^ set(b.modules))[:4]}")
    diff = max(float((a.delta_weight(p) - b.delta_weight(p)).abs().max()) for p in b.modules)
    return diff / max(float(b.delta_weight(p).abs().max()) for p in b.modules)


def check_parity(specs: list[dict], args) -> dict:
    """Ours vs PEFT on the same work (task_arithmetic r16 vs svd r16, cat vs cat): relative dW difference per pair;
    raises when a pair is off by more than PARITY_TOL (the timings would compare different merges)."""
    output = {spec["name"]: spec["output"] for spec in specs}
    result = {}
    for label, (ours, peft) in _pairs(args).items():
        result[label] = parity(output[ours], output[peft])
        if result[label] > PARITY_TOL:
            raise RuntimeError(f"{label}: ours and PEFT's merged dW differ by {result[label]:.2e} of its max")
    return result


def _pairs(args) -> dict[str, tuple[str, str]]:
    L = args.peft_layers
    return {
        f"task_arithmetic r16 vs PEFT svd r16 ({L} layers)": (f"ours task_arithmetic r16 ({L} layers)",
                                                              f"PEFT svd r16 ({L} layers)"),
        f"cat vs PEFT cat ({L} layers)": (f"ours cat exact ({L} layers)", f"PEFT cat ({L} layers)"),
    }


def report(results: dict, derived: dict) -> None:
    print(f"\n{'case':<42} {'modules':>7} {'seconds':>9} {'s/module':>9} {'peak RSS MB':>12} {'RSS before':>11}")
    for name, r in results.items():
        print(f"{name:<42} {r['modules']:>7} {r['seconds']:>9.2f} {r['seconds'] / r['modules']:>9.3f} "
              f"{r['peak_rss_mb']:>12.0f} {r['rss_before_mb']:>11.0f}")
    print()
    for label, r in derived["ratios"].items():
        print(f"{label:<52} ours is {r['time_speedup']:.1f}x faster, PEFT peak RSS {r['peak_rss_ratio']:.1f}x ours")
    for label, diff in derived["parity_vs_peft"].items():
        print(f"{label:<52} dW max |diff| / max |dW| = {diff:.1e}")
    print(f"ties delta r16, extrapolated to all {derived['all_modules']} modules: "
          f"{derived['ties_all_layers_seconds_estimate']:.0f} s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="where adapters are generated (default: a temp dir)")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--ties-layers", type=int, default=1)
    parser.add_argument("--peft-layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096, help="4096 for 7B; smaller for a quick smoke run")
    parser.add_argument("--threads", type=int, help="CPU threads of each case (default: torch's own)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/bench_merge.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    info = run_info(args.threads)  # the cases' threads: each runs in its own process
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_merge."))
    full = generate(workdir, args.adapters, args.layers, args.hidden)
    specs = cases(full, subset(full, args.ties_layers), subset(full, args.peft_layers), args, workdir / "merged")
    results = {}
    for spec in progress_bar(specs, desc="cases", unit="case"):
        results[spec["name"]] = {**run_child(spec), "method": spec["method"], "rank": spec["rank"]}
    ties = results[specs[2]["name"]]
    all_modules = args.layers * len(TARGETS)
    derived = {"ratios": ratios(results, args), "parity_vs_peft": check_parity(specs, args),
               "all_modules": all_modules,
               "ties_all_layers_seconds_estimate": ties["seconds"] / ties["modules"] * all_modules}
    report(results, derived)
    env = {**info, "load_avg_end": list(os.getloadavg()), "argv": sys.argv[1:]}
    result = {"env": env, "config": {"hidden": args.hidden, "rank": RANK, "alpha": ALPHA, "targets": TARGETS,
                                     "layers": args.layers, "adapters": args.adapters}, "cases": results, **derived}
    out = args.out or Path(__file__).parent / "results" / "bench_merge.json"
    write_json_atomic(out, result, indent=1)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
