"""Retrieval quality on taskworld and index speed at 100k adapters.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_retrieval --taskworld [--queries 20] [--out PATH]
    HF_HUB_OFFLINE=1 python -m benchmarks.bench_retrieval --scale [--n 100000] [--out PATH]

taskworld: one adapter per training task, embedded from 20 "train" inputs; queries are "test" inputs (disjoint
  from the samples). Two text forms: "prompt" (instruction + input, what the model reads) and "input" (the bare
  input, no instruction), each without and with the LoRAretriever instruction prefix. Reported: in-domain top-1
  (nearest centroid and logistic regression); out-of-domain, the query task's own adapter removed: the share of
  the top-3 from the query task's family; the same share for held-out tasks (never in the zoo).
compose: one forward of a batch whose rows each use their own k of 64 adapters (random Llama, hidden 256, 4
  layers, LoRA r=8 on all 7 projections, 32 rows x 64 tokens): k slots per row (retrieve_and_compose's routing)
  vs the reference's way, every adapter of the batch's union computed for every row with zero gates elsewhere.
scale: n synthetic unit vectors (d=384) of two kinds (see `synthetic`), queries drawn the same way; build time,
  single-query latency p50/p99 at k=10 through AdapterIndex.search_embeddings (per faiss OpenMP thread count),
  and recall@10 of each approximate setting against the exact (flat) results on the same queries.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter

import faiss
import numpy as np

from benchmarks.taskworld import examples, format_prompt, get_task, list_tasks
from benchmarks.timing import run_info
from retrieval import TASK_PREFIX, AdapterIndex, Embedder, IndexConfig, LearnedRetriever
from retrieval.samples import centroids
from lorahub_engine._io import write_json_atomic
from lorahub_engine.progress import progress_bar

SAMPLES_PER_TASK = 20


# ---------------------------------------------------------------- taskworld


def task_texts(task: str, split: str, n: int, form: str) -> list[str]:
    instruction = get_task(task).instruction
    inputs = [e.input for e in examples(task, split, n, seed=0)]
    return [format_prompt(instruction, x) if form == "prompt" else x for x in inputs]


def family_share(hits, family_of, families) -> float:
    return float(np.mean([np.mean([family_of[name] == f for name, _ in row]) for row, f in zip(hits, families)]))


def taskworld(n_queries: int) -> dict:
    training, held_out = list_tasks(held_out=False), list_tasks(held_out=True)
    family_of = {t: get_task(t).family for t in training + held_out}
    results = {}
    for form in ("prompt", "input"):
        for prefix in (None, TASK_PREFIX):
            embedder = Embedder(prefix=prefix)
            train = {t: task_texts(t, "train", SAMPLES_PER_TASK, form) for t in training}
            vectors = embedder.encode([x for t in training for x in train[t]], progress=True)
            owner = np.repeat(np.arange(len(training)), SAMPLES_PER_TASK)
            index = AdapterIndex.from_embeddings(training, centroids(vectors, owner, len(training)),
                                                 IndexConfig(kind="flat"), embedder)
            learned = LearnedRetriever(embedder=embedder).fit_embeddings(vectors, [training[i] for i in owner])
            truth = [t for t in training for _ in range(n_queries)]
            queries = embedder.encode([x for t in training for x in task_texts(t, "test", n_queries, form)],
                                      progress=True)
            ood = [index.search_embeddings(queries[i:i + 1], k=3, exclude=[t])[0] for i, t in enumerate(truth)]
            held_truth = [t for t in held_out for _ in range(n_queries)]
            held_queries = embedder.encode([x for t in held_out for x in task_texts(t, "test", n_queries, form)])
            centroid_hits = index.search_embeddings(queries, k=1)
            results[f"{form}, prefix={'yes' if prefix else 'no'}"] = {
                "centroid_top1": top1(centroid_hits, truth),
                "centroid_top1_errors": confusions(centroid_hits, truth),
                "logreg_top1": top1(learned.search_embeddings(queries, k=1), truth),
                "ood_top3_family_share": family_share(ood, family_of, [family_of[t] for t in truth]),
                "held_out_top3_family_share": family_share(index.search_embeddings(held_queries, k=3), family_of,
                                                           [family_of[t] for t in held_truth]),
            }
    return {"adapters": len(training), "held_out_tasks": len(held_out), "queries_per_task": n_queries,
            "results": results}


def top1(hits, truth) -> float:
    return float(np.mean([row[0][0] == t for row, t in zip(hits, truth)]))


def confusions(hits, truth) -> list[tuple[str, str, int]]:
    """The top-1 errors as (query task, retrieved task, count), most frequent first."""
    wrong = Counter((t, row[0][0]) for row, t in zip(hits, truth) if row[0][0] != t)
    return [(t, p, n) for (t, p), n in wrong.most_common()]


# ---------------------------------------------------------------- scale


def synthetic(n: int, d: int, seed: int, data: str) -> np.ndarray:
    """n unit vectors [n, d]; the structure (families, tasks, the projection) is fixed, `seed` draws the points.

    "clustered": 100 families x 20 tasks, adapters scattered around their task (a zoo of distinct skills).
    "continuous": a 32-d latent Gaussian with weak family offsets, projected to d, plus noise: no gaps between
    neighbours, the hard case for IVF cells and HNSW graphs alike.
    """
    structure, rng = np.random.default_rng(0), np.random.default_rng(seed)
    if data == "clustered":
        families = structure.standard_normal((100, d))
        tasks = families.repeat(20, axis=0) + 0.7 * structure.standard_normal((2000, d))  # [2000, d]
        vectors = tasks[rng.integers(len(tasks), size=n)] + 0.6 * rng.standard_normal((n, d))
    else:
        projection, families = structure.standard_normal((32, d)), structure.standard_normal((100, 32))
        latent = 0.5 * families[rng.integers(100, size=n)] + rng.standard_normal((n, 32))  # [n, 32]
        vectors = latent @ projection + 0.3 * np.sqrt(32) * rng.standard_normal((n, d))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def latencies(index: AdapterIndex, queries: np.ndarray, k: int) -> tuple[dict, list]:
    times, hits = [], []
    for q in queries:
        start = time.perf_counter()
        hits.append(index.search_embeddings(q[None], k=k)[0])
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}, hits


def recall(hits, exact) -> float:
    return float(np.mean([len({n for n, _ in h} & {n for n, _ in e}) / len(e) for h, e in zip(hits, exact)]))


def scale(n: int, d: int, n_queries: int, k: int, threads: list[int], data: str) -> dict:
    vectors, queries = synthetic(n, d, 1, data), synthetic(n_queries, d, 2, data)
    names = [f"adapter{i}" for i in range(n)]
    rows = []
    exact = {}
    sweeps = {"flat": [{}], "ivf": [{"nprobe": p} for p in (16, 32, 64, 128)],
              "hnsw": [{"ef_search": e} for e in (32, 64, 128)]}
    for kind, settings in sweeps.items():
        start = time.perf_counter()
        index = AdapterIndex.from_embeddings(names, vectors, IndexConfig(kind=kind))
        build_s = time.perf_counter() - start
        for params in progress_bar(settings, desc=f"{data} {kind}"):
            index.set_search_params(**params)
            for t in threads:
                faiss.omp_set_num_threads(t)
                timing, hits = latencies(index, queries, k)
                exact.setdefault(t, hits)  # the first rows are flat's
                rows.append({"data": data, "kind": kind, **params, "threads": t, "build_s": round(build_s, 2),
                             **timing, "recall@10": recall(hits, exact[t])})
    return {"n": n, "d": d, "queries": n_queries, "k": k, "rows": rows}


def compose_cost(n_adapters: int, rows: int, seq: int, k: int, repeats: int) -> dict:
    import torch
    import transformers as tf

    import lorahub_engine as le

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4)
    model = tf.LlamaForCausalLM(config).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = [le.init_adapter(model, f"a{i}", targets, r=8, seed=i) for i in range(n_adapters)]
    g = torch.Generator().manual_seed(0)
    for adapter in adapters:
        for m in adapter.modules.values():
            m.B.copy_(0.01 * torch.randn(m.B.shape, generator=g))
    le.attach(model, adapters)
    idx = torch.stack([torch.randperm(n_adapters, generator=g)[:k] for _ in range(rows)])  # [rows, k]
    gates = torch.full((rows, k), 1.0 / k)
    union = idx.unique()  # [u]
    idx_union = union.expand(rows, -1)  # [rows, u]: every row computes every adapter of the batch
    gates_union = (idx_union[:, :, None] == idx[:, None, :]).float() @ gates[:, :, None]  # [rows, u, 1]
    x = torch.randint(1000, (rows, seq), generator=g)

    def run(routing_idx=None, routing_gates=None):
        with torch.no_grad():
            if routing_idx is None:
                return model(x).logits
            with le.routing(model, routing_idx, routing_gates):
                return model(x).logits

    cases = {"base": lambda: run(), "k slots": lambda: run(idx, gates),
             "union": lambda: run(idx_union, gates_union[..., 0])}
    torch.testing.assert_close(cases["k slots"](), cases["union"](), atol=1e-4, rtol=1e-4)
    times = {name: [] for name in cases}
    for _ in progress_bar(range(repeats), desc="compose"):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    return {"adapters": n_adapters, "rows": rows, "seq": seq, "k": k, "union": int(len(union)),
            "seconds": medians}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--taskworld", action="store_true")
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--compose", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of --compose")
    parser.add_argument("--queries", type=int, default=20, help="taskworld test inputs per task")
    parser.add_argument("--n", type=int, default=100_000, help="synthetic adapters for --scale")
    parser.add_argument("--scale-queries", type=int, default=1000)
    parser.add_argument("--threads", type=str, default="1,2", help="faiss OpenMP threads to time, comma-separated")
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args(argv)
    report = {"env": run_info(faiss.omp_get_max_threads())}  # threads: faiss's; --scale times its own list
    if args.taskworld:
        report["taskworld"] = taskworld(args.queries)
        for name, r in report["taskworld"]["results"].items():
            print(f"{name:22s} top1 centroid {r['centroid_top1']:.3f}  logreg {r['logreg_top1']:.3f}  "
                  f"OOD family@3 {r['ood_top3_family_share']:.3f}  held-out family@3 "
                  f"{r['held_out_top3_family_share']:.3f}")
            errors = r["centroid_top1_errors"]
            print(f"{'':22s} {sum(n for *_, n in errors)} centroid top-1 errors: "
                  + ", ".join(f"{t} -> {p} {n}" for t, p, n in errors[:6]))
    if args.scale:
        threads = [int(t) for t in args.threads.split(",")]
        report["scale"] = [scale(args.n, 384, args.scale_queries, 10, threads, data)
                           for data in ("clustered", "continuous")]
        rows = [r for part in report["scale"] for r in part["rows"]]
        flat = {(r["data"], r["threads"]): r for r in rows if r["kind"] == "flat"}
        for r in rows:
            setting = ", ".join(f"{k}={r[k]}" for k in ("nprobe", "ef_search", "threads") if k in r)
            print(f"{r['data']:10s} {r['kind']:5s} {setting:24s} build {r['build_s']:7.2f} s  p50 {r['p50_ms']:.3f} ms "
                  f"(x{flat[r['data'], r['threads']]['p50_ms'] / r['p50_ms']:.1f} vs flat)  p99 {r['p99_ms']:.3f} ms  "
                  f"recall@10 {r['recall@10']:.3f}")
    if args.compose:
        report["compose"] = c = compose_cost(64, 32, 64, 3, args.repeats)
        t = c["seconds"]
        lora = {name: t[name] - t["base"] for name in ("k slots", "union")}
        print(f"compose: {c['rows']} rows x {c['seq']} tokens, k={c['k']}, union of {c['union']} adapters: "
              f"base {t['base'] * 1e3:.1f} ms, k slots {t['k slots'] * 1e3:.1f} ms, union {t['union'] * 1e3:.1f} ms "
              f"(x{t['union'] / t['k slots']:.2f} total, x{lora['union'] / max(lora['k slots'], 1e-9):.1f} LoRA part)")
    if args.out:
        report["env"]["load_avg_end"] = list(os.getloadavg())
        write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
