"""Cross-task rows for the routers (registered like benchmarks/methods.py's): per-token routing over the zoo.

    arrow          Arrow over every zoo adapter, top-3 per token, training-free
    mole_shots     MoLE gates (top-4) over the 20 adapters retrieved for the shots, trained on the 5 shots:
                   the gradient-trained competitor of retrieval_lorahub at the same examples and modules
    mole_mixture   MoLE gates (top-4) over every zoo adapter, trained once per run on a mixture of the zoo's
                   training tasks, then run unchanged on every held-out task
Top-4 rather than dense: on this shared 2-core box a dense step over the 60-adapter zoo took ~15 s.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import lorahub_engine as le
from benchmarks.harness import Context, MethodOutput, register_method
from benchmarks.methods import LORAHUB_MODULES, answer
from benchmarks.taskworld_zoo import task_pairs
from lorahub_engine.search import retrieved_modules
from routers import ArrowConfig, MoLEConfig, attach_router, load_router, save_router, train_router

TOP_K = 4
SHOTS_STEPS, SHOTS_LR = 50, 1e-2  # 5 examples: 50 full-batch steps
MIXTURE_STEPS, MIXTURE_PER_TASK, MIXTURE_LR = 150, 8, 1e-2  # 150 batches of 8 over 8 train examples per task


def routed_answers(ctx: Context, router_of) -> MethodOutput:
    """Answers to the test inputs with the router `router_of(model)` attaches; the base is clean afterwards."""
    model = ctx.base.model
    try:
        router_of(model)
        return answer(ctx, [ctx.prompt(x) for x, _ in ctx.test])
    finally:
        le.detach(model)


@register_method("arrow", uses_shots=False)
def arrow(ctx: Context) -> MethodOutput:
    """Arrow (training-free): per token, top-3 of every zoo adapter by |<x, prototype>|."""
    return routed_answers(ctx, lambda model: attach_router(model, ArrowConfig(top_k=3), list(ctx.zoo)))


@register_method("mole_shots")
def mole_shots(ctx: Context) -> MethodOutput:
    """MoLE gates (top-4) over the 20 modules retrieved for the shots, trained on the 5 shots (50 steps)."""
    names = retrieved_modules(ctx.index, [ctx.query(x) for x, _ in ctx.shots], LORAHUB_MODULES)

    def router(model):
        attach_router(model, MoLEConfig(top_k=TOP_K), [ctx.zoo[n] for n in names])
        with torch.enable_grad():
            train_router(model, ctx.base.tokenizer, ctx.shot_pairs(), steps=SHOTS_STEPS, lr=SHOTS_LR,
                         batch_size=len(ctx.shots), seed=ctx.seed, progress=False)

    return routed_answers(ctx, router)._replace(info={"adapters": names})


@register_method("mole_mixture", uses_shots=False)
def mole_mixture(ctx: Context) -> MethodOutput:
    """MoLE gates (top-4) over every zoo adapter, trained once on a mixture of the zoo's training tasks."""
    folder = _mixture_router(ctx)
    return routed_answers(ctx, lambda model: load_router(model, folder, experts=list(ctx.zoo)))


def _mixture_router(ctx: Context) -> Path:
    """The run's mixture router folder, trained on first use (cached for the run)."""
    key = ("mole_mixture",)
    if key not in ctx.cache:
        ctx.cache[key] = train_mixture_router(ctx.base, ctx.zoo, Path(tempfile.mkdtemp(prefix="mole_mixture.")))
    return ctx.cache[key]


def mixture_pairs(base, zoo, sample_type=None) -> list[tuple]:
    """MIXTURE_PER_TASK train examples of each zoo task (the zoo's adapters are named after their training tasks):
    what every router trained on the training-task mixture learns from; with `sample_type(task)`, as a third field."""
    return [(*pair, sample_type(name)) if sample_type else pair for name in zoo.names
            for pair in task_pairs(base, name, "train", MIXTURE_PER_TASK, seed=1)]


def train_mixture_router(base, zoo, folder: Path, progress: bool = False) -> Path:
    """MoLE gates over every zoo adapter trained on `mixture_pairs`; saved to folder/router, the base left clean."""
    pairs = mixture_pairs(base, zoo)
    model = base.model
    try:
        attach_router(model, MoLEConfig(top_k=TOP_K), list(zoo))
        with torch.enable_grad():
            train_router(model, base.tokenizer, pairs, steps=MIXTURE_STEPS, lr=MIXTURE_LR, seed=0, progress=progress)
        save_router(model, folder / "router")
    finally:
        le.detach(model)
    return folder / "router"
