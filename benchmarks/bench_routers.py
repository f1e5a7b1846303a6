"""Speed of routed forwards (MoLE, Arrow) against the base forward and PEFT's Arrow and X-LoRA, and of the
trainable-expert MoEs (SiRA, LoRAMoE) against the base, one plain LoRA and two baselines, in one run.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_routers [--repeats 3] [--threads 1 2] [--rows 8] [--seq 128]
        [--layers 30] [--clock wall|process] [--suite frozen moe] [--device cpu|cuda]
    (process: CPU seconds of this process, for 1 thread on a busy box; cuda: every model in bf16, the Triton backend)

Model: a SmolLM2-135M-shaped random Llama (30 layers, hidden 576, intermediate 1536, 9 heads, 3 kv heads, vocab
512), 16 random adapters with r=8 on all 7 projections, a batch of rows x seq tokens, fp32 and the torch backend on
the CPU, bf16 and the Triton backend on CUDA (the grouped op's "auto"). Cases:
  base           the plain model
  mole_dense     MoLE gates (random weights), all 16 experts per token through the grouped op
  mole_top2      MoLE gates, top-2 of 16 per token
  arrow_top3     Arrow, top-3 of 16 per token (only the 3 chosen experts computed)
  peft_arrow     PEFT's create_arrow_model(ArrowConfig(top_k=3)) on the same adapters (computes all 16)
  peft_xlora     PEFT's X-LoRA (depth-1 classifier, dense) on the same adapters (two passes per forward; not on
                 CUDA: it fails in bf16)
Each ratio is the median over repeats of a case's time over the base's timed right before it (benchmarks.timing).
Also printed: the max |logit difference| between our Arrow and PEFT's (same rule, same adapters).
Suite "moe" (benchmarks.moe_cases; new experts r=8 on all 7 projections): forwards of lora, sira_top2 (top-2 of 8),
dense8 and loop8 (the same router, all 8 experts densely / a Python loop over experts), loramoe6 over the base
forward; training steps of the same over a training step of the base with one plain LoRA r=8 (lora); and
dense8 / sira_top2, loop8 / sira_top2 side by side, of total times and of the time added to the base's forward.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from benchmarks.moe_cases import moe_models, training_step
from benchmarks.timing import CLOCKS, measure, paired_ratio, run_info
from lorahub_engine._io import write_json_atomic
from routers import ArrowConfig, MoLEConfig, attach_router

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERTS, RANK, SEED = 16, 8, 0


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def random_adapters(model, folder: Path) -> tuple[list, list[str]]:
    """EXPERTS PEFT LoRA folders with random factors (r=8, alpha 16), and the same adapters in memory. Each A's first
    row is stretched x4: a clear top singular direction, so PEFT's 15 power iterations find the same prototypes as
    our exact ones and both Arrows route alike (random factors without a gap route differently after 15 steps)."""
    import lorahub_engine as le

    g = torch.Generator().manual_seed(SEED)
    adapters, paths = [], []
    for i in range(EXPERTS):
        adapter = le.init_adapter(model, f"e{i}", TARGETS, r=RANK, alpha=2.0 * RANK, seed=i)
        for m in adapter.modules.values():
            m.A.normal_(generator=g).div_(m.A.shape[1] ** 0.5)
            m.B.normal_(generator=g).div_(RANK ** 0.5)
            m.A[0].mul_(4.0)
        adapter.save(folder / adapter.name)
        adapters.append(adapter)
        paths.append(str(folder / adapter.name))
    return adapters, paths


def routed_models(base, adapters, paths) -> dict:
    from peft import ArrowConfig as PeftArrowConfig
    from peft import XLoraConfig, create_arrow_model, get_peft_model

    mole_dense = attach_router(copy.deepcopy(base), MoLEConfig(), adapters)
    mole_top2 = attach_router(copy.deepcopy(base), MoLEConfig(top_k=2), adapters)
    g = torch.Generator().manual_seed(SEED + 1)
    for model in (mole_dense, mole_top2):  # trained-looking gates: random, not the all-equal start
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    arrow = attach_router(copy.deepcopy(base), ArrowConfig(top_k=3), adapters)
    peft_arrow = create_arrow_model(copy.deepcopy(base), paths, PeftArrowConfig(top_k=3, router_temperature=1.0))
    xlora_base = copy.deepcopy(base)
    xlora_base.config.use_cache = False
    xlora = get_peft_model(xlora_base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=576, xlora_depth=1,
                                                   adapters={str(i): p for i, p in enumerate(paths)}))
    return {"mole_dense": mole_dense, "mole_top2": mole_top2, "arrow_top3": arrow, "peft_arrow": peft_arrow.eval(),
            "peft_xlora": xlora.eval()}


def run(threads: int, models: dict, base, ids, repeats: int, clock: str) -> dict:
    torch.set_num_threads(threads)
    cases = {"base": lambda: base(ids)}
    cases.update({name: (lambda m=m: m(input_ids=ids)) for name, m in models.items()})
    with torch.inference_mode():
        timings = measure(cases, ids.device, repeats, desc=f"{threads} thread(s)", reference="base",
                          clock=CLOCKS[clock])
    return {"threads": threads, "seconds_median": timings["median"],
            "ratio_to_base": {name: paired_ratio(timings, name, "base") for name in models}}


def run_moe(threads: int, models: dict, base, ids, repeats: int, clock: str) -> dict:
    """Forward ratios to the base forward and training-step ratios to the plain LoRA's step, one thread count."""
    torch.set_num_threads(threads)
    forward = {"base": lambda: base(ids)}
    forward.update({name: (lambda m=m: m(input_ids=ids)) for name, m in models.items()})
    with torch.inference_mode():
        fwd = measure(forward, ids.device, repeats, desc=f"moe forward, {threads} thread(s)",
                      reference="base", clock=CLOCKS[clock])
    labels = torch.randint(0, base.config.vocab_size, ids.shape, generator=torch.Generator().manual_seed(SEED))
    steps = {name: training_step(m, ids, labels.to(ids.device)) for name, m in models.items()}
    step = measure(steps, ids.device, repeats, desc=f"moe step, {threads} thread(s)", reference="lora",
                   clock=CLOCKS[clock])
    forward_ratio = {name: paired_ratio(fwd, name, "base") for name in models}
    step_ratio = {name: paired_ratio(step, name, "lora") for name in models if name != "lora"}
    added = {name: (forward_ratio[name] - 1) / max(forward_ratio["sira_top2"] - 1, 1e-9)
             for name in ("dense8", "loop8")}
    return {"threads": threads, "forward_seconds_median": fwd["median"], "step_seconds_median": step["median"],
            "forward_ratio_to_base": forward_ratio, "step_ratio_to_lora_step": step_ratio,
            "vs_sira_top2": {f"{name}_{kind}": ratios[name] / ratios["sira_top2"]
                             for kind, ratios in (("forward", forward_ratio), ("step", step_ratio))
                             for name in ("dense8", "loop8")},
            "vs_sira_top2_added_forward": added}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS))
    parser.add_argument("--suite", nargs="+", default=["frozen", "moe"], choices=["frozen", "moe"],
                        help="frozen: MoLE / Arrow / PEFT over 16 given adapters; moe: SiRA / LoRAMoE and baselines")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output", default="benchmarks/results/bench_routers.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = build_model(args.layers)
    ids = torch.randint(0, 512, (args.rows, args.seq), generator=torch.Generator().manual_seed(SEED)).to(device)
    result = {"config": vars(args), "run": run_info()}
    if "frozen" in args.suite:
        with tempfile.TemporaryDirectory() as tmp:
            adapters, paths = random_adapters(base, Path(tmp))
            models = {name: m.to(device, dtype) for name, m in routed_models(base, adapters, paths).items()}
        if dtype != torch.float32:
            del models["peft_xlora"]  # PEFT's X-LoRA fails in bf16 (fp32 meets bf16 in its LoRA layers' matmul)
        base.to(device, dtype)  # in place; the cases were built on the CPU in fp32 (PEFT's Arrow, X-LoRA from files)
        with torch.inference_mode():
            parity = float((models["arrow_top3"](ids).logits - models["peft_arrow"](input_ids=ids).logits).abs().max())
        result.update(arrow_vs_peft_max_abs_logit_diff=parity,
                      runs=[run(t, models, base, ids, args.repeats, args.clock) for t in args.threads])
        del models
    if "moe" in args.suite:
        models = {name: m.to(device, dtype) for name, m in moe_models(base, SEED).items()}
        base.to(device, dtype)
        result["moe_runs"] = [run_moe(t, models, base, ids, args.repeats, args.clock) for t in args.threads]
    write_json_atomic(args.output, result)
    _print(result)
    return result


def _print(result: dict) -> None:
    if "runs" in result:
        print(f"Arrow vs PEFT Arrow: max |logit diff| {result['arrow_vs_peft_max_abs_logit_diff']:.2e}")
        _table(result["runs"], "ratio_to_base", "base s", lambda r: r["seconds_median"]["base"])
    if "moe_runs" in result:
        print("MoE forward, ratio to the base forward:")
        _table(result["moe_runs"], "forward_ratio_to_base", "base s", lambda r: r["forward_seconds_median"]["base"])
        print("MoE training step, ratio to a step of the base with one plain LoRA r=8:")
        _table(result["moe_runs"], "step_ratio_to_lora_step", "lora step s", lambda r: r["step_seconds_median"]["lora"])
        print("Baselines over SiRA top-2 (total time; forward's added time over the base):")
        _table(result["moe_runs"], "vs_sira_top2")
        _table(result["moe_runs"], "vs_sira_top2_added_forward")


def _table(runs: list[dict], key: str, first: str = "", first_value=None) -> None:
    """One row per thread count: `first` (seconds, when given), then each case's ratio under `key`."""
    names = list(runs[0][key])
    head = ["threads", first] if first else ["threads"]
    print("| " + " | ".join(head + names) + " |")
    print("|---" * (len(head) + len(names)) + "|")
    for r in runs:
        cells = [str(r["threads"])] + ([f"{first_value(r):.2f}"] if first else [])
        print("| " + " | ".join(cells + [f"{r[key][n]:.2f}x" for n in names]) + " |")


if __name__ == "__main__":
    main()
