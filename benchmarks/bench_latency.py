"""Small-batch latency (issue 16): the LoRA layer's fixed cost per call, and generate against PEFT.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_latency [--threads 1 2] [--repeats 3] [--layers 30]
                                                        [--parts overhead generate] [--scenarios 1x1 4x4 32x16]
                                                        [--clock wall]

Only public APIs (`le.attach`, `le.routing`, `model.generate`), so the script measures whatever layer main has.
overhead   one 576 -> 576 projection (SmolLM2-135M's q_proj) called `--layers` times per forward (its weights stay
           in cache), no grad. Per layer call, in microseconds: the LoRA layer's time minus the base projection and the two plain matmuls the routing needs
           (`addmm_(out, x @ A^T, B^T)` with one expert's factors, or k experts' side by side for top-k). Routings:
           one expert for every token (a bank of 1, `le.routing(model, [[0]])`), per-row experts (a bank of 16,
           row n -> adapter n % 16), per-token top-2 of 16 with softmax gates; at 1 token (1 x 1), 8 (8 rows x 1)
           and 512 (8 x 64). PEFT's overhead beside it where PEFT has the case (one adapter; per row by
           `adapter_names`).
generate   a SmolLM2-135M-shaped random Llama (30 layers, hidden 576, vocab 512), LoRA r=8 on all 7 projections,
           prompt 16 tokens, 48 new tokens, greedy, KV cache: base, ours and PEFT for 1 request with 1 adapter,
           4 requests with 4 adapters (PEFT `adapter_names`), 32 requests with 16 adapters. Total time, prefill
           (generate with one new token) and decode (the difference); generated tokens checked equal to PEFT's.
Ratios are medians over repeats of a case against the base (or reference) timed right before it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

import lorahub_engine as le
from benchmarks.grouped.cases import peft_model, random_adapters
from benchmarks.timing import CLOCKS, measure
from lorahub_engine._io import write_json_atomic

SEED, EXPERTS, RANK, TOP_K, WIDTH = 0, 16, 8, 2, 576
TOKENS = {1: (1, 1), 8: (8, 1), 512: (8, 64)}  # tokens -> (rows, tokens per row)
PROMPT, NEW_TOKENS, VOCAB = 16, 48, 512
REQUESTS = {"1 request, 1 adapter": (1, 1), "4 requests, 4 adapters": (4, 4), "32 requests, 16 adapters": (32, 16)}
SCENARIOS = {f"{requests}x{bank}": name for name, (requests, bank) in REQUESTS.items()}  # --scenarios 1x1 4x4 32x16

clock = CLOCKS["wall"]  # set from --clock in main


# ---------------------------------------------------------------- per-call overhead


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x):
        return self.q_proj(x)


class Stack(nn.Module):
    """One projection applied `calls` times per forward: a decoder's LoRA layer calls without the rest of the model,
    on weights that stay in cache (what is measured is the fixed cost per call, not the memory bandwidth of a
    model's worth of weights, which a shared machine makes noisy)."""

    def __init__(self, calls: int):
        super().__init__()
        self.block, self.calls = Block(), calls

    def forward(self, x):
        for _ in range(self.calls):  # the same input each time: no activation grows over the calls
            y = self.block(x)
        return y


class PlainLora(nn.Module):
    """The reference: the base projection and the two plain matmuls of one (rank k*r) LoRA, scale folded into B."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.base, self.A, self.B = base, A, B  # (k*r, in), (out, k*r)

    def forward(self, x):
        out = self.base(x)
        flat = out.view(-1, out.shape[-1])
        flat.addmm_(x.reshape(-1, x.shape[-1]) @ self.A.T, self.B.T)
        return out


def reference_stack(base: Stack, adapters: list[le.LoraAdapter], experts: list[int]) -> Stack:
    """`base` with its projection wrapped in PlainLora over these experts' factors side by side."""
    stack = copy.deepcopy(base)
    mods = [adapters[e].modules["block.q_proj"] for e in experts]
    A = torch.cat([m.A for m in mods])  # (k*r, in)
    B = torch.cat([m.B * m.scale for m in mods], dim=1)  # (out, k*r)
    stack.block.q_proj = PlainLora(stack.block.q_proj, A, B)
    return stack


def overhead(layers: int, repeats: int) -> dict:
    """Microseconds per layer call over the plain reference (and PEFT's, where it has the case), per routing and
    token count."""
    g = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    base = Stack(layers).eval().requires_grad_(False)
    adapters = random_adapters(base, EXPERTS, g)
    ours1 = le.attach(copy.deepcopy(base), adapters[:1])
    ours16 = le.attach(copy.deepcopy(base), adapters)
    peft = peft_model(copy.deepcopy(base), adapters)
    report = {}
    for T, (rows, seq) in TOKENS.items():
        x = torch.randn(rows, seq, WIDTH, generator=g)
        row_ids = torch.arange(rows) % EXPERTS
        top = torch.rand(T, EXPERTS, generator=g).topk(TOP_K, dim=1).indices
        gates = torch.softmax(torch.randn(T, TOP_K, generator=g), dim=1)
        names = [adapters[i].name for i in row_ids.tolist()]
        cases = {
            "one_expert": (ours1, (torch.zeros(1, 1, dtype=torch.long), None), [0],
                           lambda: peft(x)),  # PEFT's active adapter: a0
            "per_row": (ours16, (row_ids[:, None], None), [0], lambda: _peft_call(peft, x, names)),
            "top2_per_token": (ours16, (top, gates), list(range(TOP_K)), None),
        }
        report[T] = {}
        for name, (model, route, ref_experts, peft_call) in cases.items():
            reference = reference_stack(base, adapters, ref_experts)

            def ours(model=model, route=route):
                with le.routing(model, *route):
                    return model(x)

            with torch.no_grad():
                inner = _inner(lambda: reference(x))
                timed = {"reference": lambda: reference(x), "ours": ours}
                if peft_call is not None:
                    timed["peft"] = peft_call
                t = measure(timed, torch.device("cpu"), repeats, inner, desc=f"overhead {name} T={T}", clock=clock,
                            reference="reference")
            report[T][name] = {"reference_us": t["median"]["reference"] / layers * 1e6}
            for case in t["paired"]:  # median of paired differences; difference of the fastest rounds
                report[T][name][f"{case}_us"] = statistics.median(c - r for r, c in t["paired"][case]) / layers * 1e6
                report[T][name][f"{case}_min_us"] = (t["min"][case] - t["min"]["reference"]) / layers * 1e6
    return report


def _peft_call(peft: nn.Module, x: torch.Tensor, names: list[str]):
    return peft(x, adapter_names=names)


def _inner(fn, target_s: float = 0.05) -> int:
    """Calls per timed sample so that a sample lasts about target_s."""
    fn()
    start = time.perf_counter()
    fn()
    return max(1, int(target_s / max(time.perf_counter() - start, 1e-6)))


# ---------------------------------------------------------------- generate


def build_causal_lm(layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None  # always NEW_TOKENS tokens
    model.generation_config.pad_token_id = 0
    return model


def generate_table(layers: int, repeats: int, scenarios=tuple(SCENARIOS)) -> dict:
    g = torch.Generator().manual_seed(SEED)
    base = build_causal_lm(layers)
    adapters = random_adapters(base, EXPERTS, g)
    peft1, peft16 = peft_model(copy.deepcopy(base), adapters[:1]), peft_model(copy.deepcopy(base), adapters)
    report = {}
    for scenario in (SCENARIOS[name] for name in scenarios):
        requests, bank = REQUESTS[scenario]
        ours = le.attach(copy.deepcopy(base), adapters[:bank])
        peft = peft1 if bank == 1 else peft16
        ids = torch.randint(0, VOCAB, (requests, PROMPT), generator=g)
        row_ids = torch.arange(requests) % bank
        names = [adapters[i].name for i in row_ids.tolist()]

        def run(which: str, new_tokens: int):
            kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          use_cache=True)
            if which == "base":
                return base.generate(ids, **kwargs)
            if which == "peft":
                return peft.generate(input_ids=ids, **kwargs) if bank == 1 else peft.generate(
                    input_ids=ids, adapter_names=names, **kwargs)
            with le.routing(ours, row_ids[:, None]):
                return ours.generate(ids, **kwargs)

        with torch.no_grad():
            ours_tokens, peft_tokens = run("ours", NEW_TOKENS), run("peft", NEW_TOKENS)
            cases = {f"{w}{suffix}": (lambda w=w, n=n: run(w, n))
                     for suffix, n in (("", NEW_TOKENS), ("_prefill", 1)) for w in ("base", "ours", "peft")}
            total = measure({k: v for k, v in cases.items() if "prefill" not in k}, torch.device("cpu"), repeats,
                            desc=f"generate {scenario}", clock=clock, reference="base")
            prefill = measure({k: v for k, v in cases.items() if "prefill" in k}, torch.device("cpu"), repeats,
                              desc=f"prefill {scenario}", clock=clock, reference="base_prefill")
        report[scenario] = {
            "tokens_equal_peft": bool(torch.equal(ours_tokens, peft_tokens)),
            "total_s": {w: total["median"][w] for w in ("base", "ours", "peft")},
            "prefill_s": {w: prefill["median"][f"{w}_prefill"] for w in ("base", "ours", "peft")},
            **ratios(total, prefill),
        }
    return report


def ratios(total: dict, prefill: dict) -> dict:
    """Paired medians: total and prefill of ours and PEFT over the base timed just before, and decode (total minus
    the median prefill) ratios."""
    def paired(t, case, ref):
        return statistics.median(c / r for r, c in t["paired"][case]) if case != ref else 1.0

    pre = {w: prefill["median"][f"{w}_prefill"] for w in ("base", "ours", "peft")}

    def decode(w):  # (base decode, case decode) per round
        return [(r - pre["base"], c - pre[w]) for r, c in total["paired"][w]]

    return {
        "ours/base": paired(total, "ours", "base"), "peft/base": paired(total, "peft", "base"),
        "ours/peft": statistics.median(o / p for o, p in zip(total["rounds"]["ours"], total["rounds"]["peft"])),
        "decode ours/base": statistics.median(c / r for r, c in decode("ours")),
        "decode peft/base": statistics.median(c / r for r, c in decode("peft")),
        "decode peft/ours (speedup)": statistics.median(
            (p - pre["peft"]) / (o - pre["ours"]) for o, p in zip(total["rounds"]["ours"], total["rounds"]["peft"])),
        "prefill ours/base": paired(prefill, "ours_prefill", "base_prefill"),
        "prefill peft/base": paired(prefill, "peft_prefill", "base_prefill"),
    }


# ---------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=30, help="30 for SmolLM2-135M; fewer for a quick smoke run")
    parser.add_argument("--parts", nargs="+", choices=("overhead", "generate"), default=["overhead", "generate"])
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS),
                        help="generate: requests x adapters")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_latency_cpu.json")
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    result = {"env": _env(args), "threads": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        entry = result["threads"][threads] = {}
        if "overhead" in args.parts:
            entry["overhead_us"] = overhead(args.layers, args.repeats)
        if "generate" in args.parts:
            entry["generate"] = generate_table(args.layers, args.repeats, args.scenarios)
        _print(threads, entry)
        result["env"]["load_avg_end"] = os.getloadavg()
        write_json_atomic(args.out, result, indent=1)  # after each thread count: a long run keeps what it measured
        print(f"wrote {args.out}")
    return result


def _env(args) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"device": platform.processor() or "cpu", "torch": torch.__version__, "commit": commit, "clock": args.clock,
            "layers": args.layers, "repeats": args.repeats, "native": os.environ.get("LORAHUB_ENGINE_NATIVE", "1"),
            "load_avg_start": os.getloadavg()}


def _print(threads: int, entry: dict) -> None:
    print(f"\n=== {threads} thread(s)")
    if "overhead_us" in entry:
        print("overhead per layer call over base + two plain matmuls (us, median)")
        for T, cases in entry["overhead_us"].items():
            for name, row in cases.items():
                print(f"  T={T:<4d} {name:16s} " + "  ".join(f"{k}={v:8.1f}" for k, v in row.items()))
    for scenario, row in entry.get("generate", {}).items():
        print(f"{scenario}: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
                                            if not isinstance(v, dict)}))
        print("    total s " + json.dumps({k: round(v, 3) for k, v in row["total_s"].items()})
              + "  prefill s " + json.dumps({k: round(v, 4) for k, v in row["prefill_s"].items()}))


if __name__ == "__main__":
    main()
