"""Cross-task rows of the trainable-expert MoEs, against one multi-task LoRA of the same trainable size.

    sira             SiRA, top-2 of 8 new experts (rank 4 on the zoo's targets), trained once per run on the mixture
                     of the zoo's training tasks (the same examples as mole_mixture), then run on every task
    loramoe          LoRAMoE, 6 experts in groups (3, 3), dense; an example's type = its task family's group (the
                     sorted families split in two halves), the localized balance constraint on
    multitask_lora   one LoRA trained on the same mixture, its rank chosen so its trainable parameters match SiRA's
                     (experts and routers)
Each trains once per run (cached) and answers every task's test inputs unchanged.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import lorahub_engine as le
from benchmarks.harness import Context, MethodOutput, register_method
from benchmarks.router_methods import MIXTURE_STEPS, mixture_pairs, routed_answers
from benchmarks.taskworld import get_task
from benchmarks.methods import answer
from benchmarks.training import TrainSpec, train_adapters
from lorahub_engine.lora_layer import LoraLayer
from routers import LoRAMoEConfig, SiRAConfig, attach_router, load_router, save_router, train_router

TARGETS = TrainSpec().targets
MOE_LR = 2e-3
CONFIGS = {
    "sira": SiRAConfig(num_experts=8, top_k=2, rank=4, alpha=8.0, target_modules=TARGETS),
    "loramoe": LoRAMoEConfig(num_experts=6, rank=4, alpha=8.0, target_modules=TARGETS, expert_groups=(3, 3)),
}


def mixture(base, zoo, typed: bool) -> list[tuple]:
    """`mixture_pairs` (as mole_mixture trains on); typed: with the task family's group (0 for the first half of the
    sorted families, 1 for the rest) as a third field."""
    families = sorted({get_task(name).family for name in zoo.names})
    group = {f: int(i >= len(families) / 2) for i, f in enumerate(families)}
    return mixture_pairs(base, zoo, (lambda name: group[get_task(name).family]) if typed else None)


def train_moe(base, zoo, method: str, folder: Path, progress: bool = False) -> Path:
    """`method`'s MoE ("sira" / "loramoe") trained on the mixture of the zoo's tasks, saved to folder; base left
    clean."""
    model = base.model
    try:
        attach_router(model, CONFIGS[method])
        with torch.enable_grad():
            train_router(model, base.tokenizer, mixture(base, zoo, typed=method == "loramoe"), steps=MIXTURE_STEPS,
                         lr=MOE_LR, seed=0, progress=progress)
        save_router(model, folder)
    finally:
        le.detach(model)
    return folder


def train_multitask_lora(base, zoo, progress: bool = False) -> le.LoraAdapter:
    """One LoRA trained on the same mixture, its rank matched to SiRA's trainable parameters."""
    rank = matched_rank(base.model, CONFIGS["sira"])
    spec = TrainSpec(r=rank, alpha=2.0 * rank, steps=MIXTURE_STEPS, rows_per_adapter=8, lr=MOE_LR)
    with torch.enable_grad():
        adapters, _ = train_adapters(base, {"multitask": mixture(base, zoo, typed=False)}, spec, progress=progress)
    return adapters[0]


def _trained_router(ctx: Context, method: str) -> Path:
    """The run's router folder for `method`, trained on first use."""
    key = (method, "mixture")
    if key not in ctx.cache:
        folder = Path(tempfile.mkdtemp(prefix=f"{method}_mixture.")) / "router"
        ctx.cache[key] = train_moe(ctx.base, ctx.zoo, method, folder)
    return ctx.cache[key]


@register_method("sira", uses_shots=False)
def sira(ctx: Context) -> MethodOutput:
    """SiRA top-2 of 8 new experts (r=4) trained once on the training-task mixture."""
    return routed_answers(ctx, lambda model: load_router(model, _trained_router(ctx, "sira")))


@register_method("loramoe", uses_shots=False)
def loramoe(ctx: Context) -> MethodOutput:
    """LoRAMoE, 6 new experts (r=4) in groups (3, 3), trained once on the typed training-task mixture."""
    return routed_answers(ctx, lambda model: load_router(model, _trained_router(ctx, "loramoe")))


def matched_rank(model, config) -> int:
    """The rank of one LoRA on config's targets with about as many trainable parameters as the MoE would have
    (its experts, sum_e r_e (in + out) per module, and its routers)."""
    probe = attach_router(model, config)
    try:
        layers = [m for m in probe.modules() if isinstance(m, LoraLayer)]
        total = sum(sum(layer.ranks) * (layer.lora_A.shape[2] + layer.lora_B.shape[1])
                    + sum(p.numel() for p in layer.router.parameters()) for layer in layers)
        per_rank = sum(layer.lora_A.shape[2] + layer.lora_B.shape[1] for layer in layers)
    finally:
        le.detach(probe)
    return max(1, round(total / per_rank))


@register_method("multitask_lora", uses_shots=False)
def multitask_lora(ctx: Context) -> MethodOutput:
    """One LoRA trained on the training-task mixture, as many trainable parameters as sira."""
    key = ("multitask_lora",)
    if key not in ctx.cache:
        ctx.cache[key] = train_multitask_lora(ctx.base, ctx.zoo)
    adapter = ctx.cache[key]
    model = ctx.base.model
    with le.attached(model, [adapter]):
        le.set_weights(model, [1.0])
        out = answer(ctx, [ctx.prompt(x) for x, _ in ctx.test])
    return out._replace(info={"rank": adapter.modules[next(iter(adapter.modules))].rank})
