"""bench_grouped's timings: model level (forward and training step, each case paired with the base), op level per
projection shape, and each backend primitive alone. `clock` is one of benchmarks.timing.CLOCKS."""

from __future__ import annotations

import contextlib
import copy

import torch

import lorahub_engine as le
from benchmarks.grouped.cases import (
    EXPERTS,
    RANK,
    ROWS,
    SEED,
    SEQ,
    SHAPES,
    TOP_K,
    DenseHooks,
    assignments,
    build_body,
    dense_all_experts,
    dense_each_expert,
    max_diff,
    peft_model,
    per_expert_loop,
    random_adapters,
)
from benchmarks.timing import measure
from lorahub_engine.ops import grouped_lora
from lorahub_engine.ops.grouped import resolve_backend


def model_level(layers: int, device, dtype, repeats: int, clock) -> dict:
    g = torch.Generator().manual_seed(SEED)
    base = build_body(layers, device, dtype)
    adapters = random_adapters(base, EXPERTS, g)
    ours16 = le.attach(copy.deepcopy(base), adapters, trainable=True)
    ours1 = le.attach(copy.deepcopy(base), adapters[:1])
    peft = peft_model(copy.deepcopy(base), adapters)
    ids = torch.randint(0, 49152, (ROWS, SEQ), generator=g).to(device)
    row_ids = torch.arange(ROWS, device=device) % EXPERTS
    names = [adapters[i].name for i in row_ids.tolist()]
    top2 = {  # (idx, gates): per token, as a router routes; per row, as a retrieval mixture or population does
        "per_token": (torch.rand(ROWS * SEQ, EXPERTS, generator=g).topk(TOP_K, dim=1).indices.to(device),
                      torch.softmax(torch.randn(ROWS * SEQ, TOP_K, generator=g), dim=1).to(device)),
        "per_row": (torch.rand(ROWS, EXPERTS, generator=g).topk(TOP_K, dim=1).indices.to(device),
                    torch.softmax(torch.randn(ROWS, TOP_K, generator=g), dim=1).to(device)),
    }
    dense = copy.deepcopy(base)
    hooks = DenseHooks(dense, adapters, *top2["per_token"], trainable=True)

    def top2_ours(how: str):
        def forward():
            with le.routing(ours16, *top2[how]):
                return ours16(ids).last_hidden_state

        return forward

    with torch.inference_mode():
        parity = {
            "16_distinct_ours_vs_peft": max_diff(ours16(ids, adapter_ids=row_ids).last_hidden_state,
                                                  peft(input_ids=ids, adapter_names=names).last_hidden_state),
            "top2_per_token_ours_vs_dense": max_diff(top2_ours("per_token")(), dense(ids).last_hidden_state),
        }
        forward = measure({
            "base": lambda: base(ids),
            "one_adapter": lambda: ours1(ids, adapter_ids=torch.zeros(ROWS, dtype=torch.long, device=device)),
            "16_distinct_ours": lambda: ours16(ids, adapter_ids=row_ids),
            "16_distinct_peft": lambda: peft(input_ids=ids, adapter_names=names),
            "top2_of_16_ours": top2_ours("per_token"),
            "top2_of_16_per_row_ours": top2_ours("per_row"),
            "top2_of_16_dense": lambda: dense(ids),
        }, device, repeats, desc="model forward", clock=clock, reference="base")
    embeds = base.embed_tokens(ids).detach()

    def train_step(model, params, how: str | None):
        def step():
            x = embeds.clone().requires_grad_()
            with le.routing(model, *top2[how]) if how else contextlib.nullcontext():
                loss = model(inputs_embeds=x).last_hidden_state.float().pow(2).mean()
            grads = torch.autograd.grad(loss, [x, *params])
            return grads

        return step

    lora_params = [p for n, p in ours16.named_parameters() if "lora_" in n]
    training = measure({
        "base": train_step(base, [], None),
        "top2_of_16_ours": train_step(ours16, lora_params, "per_token"),
        "top2_of_16_per_row_ours": train_step(ours16, lora_params, "per_row"),
        "top2_of_16_dense": train_step(dense, hooks.params, None),
    }, device, repeats, desc="model training step", clock=clock, reference="base")
    return {"parity_max_abs_diff": parity, "forward_s": forward, "train_step_s": training}



def op_level(layers: int, device, dtype, repeats: int, clock) -> dict:
    """Per projection shape, seconds per call; `model_sum` multiplies by the layers (7 projections per layer)."""
    g = torch.Generator().manual_seed(SEED)
    routes = assignments(device, g)
    inner = 20 if device.type == "cuda" else 1
    per_shape = {}
    for name, (d_in, d_out) in SHAPES.items():
        x = torch.randn(ROWS * SEQ, d_in, generator=g).to(device, dtype)
        W = torch.randn(d_out, d_in, generator=g).to(device, dtype) / d_in**0.5
        A = (torch.randn(EXPERTS, RANK, d_in, generator=g) / d_in**0.5).to(device, dtype)
        B = (torch.randn(EXPERTS, d_out, RANK, generator=g) / RANK**0.5).to(device, dtype)
        scale = torch.full((EXPERTS,), 2.0, device=device)
        cases = {"base_linear": lambda: x @ W.T}
        for scen in ("16_distinct", "top2_of_16"):
            idx, gates = routes[scen]
            args = (x, A, B, scale, idx, gates)
            ref = grouped_lora(*args)
            tol = 1e-3 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(per_expert_loop(*args), ref, rtol=tol, atol=tol)
            torch.testing.assert_close(dense_all_experts(*args), ref, rtol=tol, atol=tol)
            torch.testing.assert_close(dense_each_expert(*args), ref, rtol=tol, atol=tol)
            cases[f"{scen}_ours"] = lambda args=args: grouped_lora(*args)
            cases[f"{scen}_loop"] = lambda args=args: per_expert_loop(*args)
            cases[f"{scen}_dense"] = lambda args=args: dense_all_experts(*args)
            cases[f"{scen}_dense_each"] = lambda args=args: dense_each_expert(*args)
        idx, gates = routes["top2_of_16"]
        trainable = [t.clone().requires_grad_() for t in (x, A, B)]
        for method, fn in (("ours", grouped_lora), ("dense", dense_all_experts)):
            cases[f"top2_of_16_{method}_fwd_bwd"] = lambda fn=fn: torch.autograd.grad(
                fn(trainable[0], trainable[1], trainable[2], scale, idx, gates).float().square().sum(), trainable)
        per_shape[name] = measure(cases, device, repeats, inner, desc=f"op {name}", clock=clock)
    model_sum = {case: layers * sum(s["min"][case] for s in per_shape.values()) for case in per_shape["q_proj"]["min"]}
    return {"per_shape_s": per_shape, "model_sum_s": model_sum}


def primitive_level(device, dtype, repeats: int, clock) -> dict:
    """Each primitive of the backend alone, plan prebuilt (Triton kernels on CUDA, the torch backend's layouts on
    CPU): seconds and TFLOP/s per projection shape; on CUDA also GB/s by the bytes the kernels must move.
    outer is the backward's grad_A product (v * coef)^T x."""
    g = torch.Generator().manual_seed(SEED)
    routes = assignments(device, g)
    elt = torch.finfo(dtype).bits // 8
    inner = 50 if device.type == "cuda" else 3
    report = {}
    for name, (d_in, d_out) in SHAPES.items():
        x = torch.randn(ROWS * SEQ, d_in, generator=g).to(device, dtype)
        A = torch.randn(EXPERTS, RANK, d_in, generator=g).to(device, dtype)
        B = torch.randn(EXPERTS, d_out, RANK, generator=g).to(device, dtype)
        backend = resolve_backend("auto", x)
        for scen in ("16_distinct", "top2_of_16"):
            idx, gates = routes[scen]
            pairs, k = int((idx >= 0).sum()), idx.shape[1]
            plan = backend.plan(idx, EXPERTS)
            u = backend.shrink(x, A, plan)
            coef = gates.reshape(-1).float()
            left = u * coef[:, None]
            y = torch.zeros(x.shape[0], d_out, device=device, dtype=dtype)  # expand adds into it
            t = measure({"plan": lambda: backend.plan(idx, EXPERTS), "shrink": lambda: backend.shrink(x, A, plan),
                         "expand": lambda: backend.expand(u, B, coef, plan, y),
                         "outer": lambda: backend.outer(left, x, plan)},
                        device, repeats, inner=inner, desc=f"primitives {name} {scen}", clock=clock)["min"]
            flops = {"shrink": 2 * pairs * d_in * RANK, "expand": 2 * pairs * RANK * d_out,
                     "outer": 2 * pairs * RANK * d_in}
            walk = plan.walk(A.shape[1], x, A) if hasattr(plan, "walk") else "triton"
            row = {"walk": walk, "plan_s": t["plan"],
                   **{f"{p}_s": t[p] for p in flops}, **{f"{p}_tflops": flops[p] / t[p] / 1e12 for p in flops}}
            if device.type == "cuda":
                moved = {
                    "shrink": pairs * d_in * elt + EXPERTS * RANK * d_in * elt + pairs * RANK * 4,
                    # per-pair rows in fp32, then (k > 1) read again and summed into (T, out)
                    "expand": pairs * RANK * 4 + EXPERTS * d_out * RANK * elt + pairs * d_out * 4
                    + (pairs * d_out * 4 + x.shape[0] * d_out * 4 if k > 1 else 0),
                }
                row.update({f"{p}_gbps": moved[p] / t[p] / 1e9 for p in moved})
            report[f"{name}/{scen}"] = row
    return report
