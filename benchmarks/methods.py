"""The built-in cross-task methods, each a plug-in registered by name (see harness.register_method).

Adapter methods attach what they use for the call and detach it after, so the base stays clean between runs.
Retrieval reads plain prompts (instruction + input), as the zoo's manifest samples are written.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

import lorahub_engine as le
from benchmarks.harness import Context, MethodOutput, register_method
from benchmarks.training import TrainSpec, mean_losses, train_adapters
from benchmarks.taskworld_zoo import default_recipe, task_pairs
from lorahub_engine.compose import assignment, retrieve
from lorahub_engine.fewshot import generate_answers
from lorahub_engine.search import lorahub_search, random_modules, retrieved_modules

SHOTS_STEPS, SHOTS_ROWS = 40, 5  # a LoRA on the 5 shots alone: every step sees all of them


def shots_spec(base) -> TrainSpec:
    """The base's zoo adapter shape (rank, targets, lr), trained 40 steps on the 5 shots."""
    return replace(default_recipe(base).train, steps=SHOTS_STEPS, rows_per_adapter=SHOTS_ROWS)


# ---- helpers ---------------------------------------------------------------------------------------------------
def answer(ctx: Context, prompts: list[str], idx: torch.Tensor | None = None, gates: torch.Tensor | None = None,
           mode: str = "mixture") -> MethodOutput:
    """Greedy answers in batches; with idx [n, k] (and gates), row n is routed to those attached adapters."""
    model, tokenizer, size = ctx.base.model, ctx.base.tokenizer, ctx.settings.batch_size
    predictions = []
    for start in range(0, len(prompts), size):
        chunk = prompts[start:start + size]
        routed = contextlib.nullcontext() if idx is None else le.routing(
            model, idx[start:start + size], None if gates is None else gates[start:start + size], mode)
        with routed:
            predictions += generate_answers(model, tokenizer, chunk, max_new_tokens=ctx.settings.max_new_tokens)
    tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts) / len(prompts)
    return MethodOutput(predictions, tokens)


def answer_with(ctx: Context, adapter: le.LoraAdapter, info: dict | None = None) -> MethodOutput:
    """Every test input answered with one adapter."""
    prompts = [ctx.prompt(x) for x, _ in ctx.test]
    with le.attached(ctx.base.model, [adapter]):
        output = answer(ctx, prompts, idx=torch.zeros(len(prompts), 1, dtype=torch.long))
    return output._replace(info=info or {})


def retrieved_set(ctx: Context) -> list[str]:
    """The task's k adapters: retrieval scores of the shots' prompts summed per adapter, best k (cached per seed)."""
    key = ("retrieved", ctx.task.name, ctx.seed)
    if key not in ctx.cache:
        ctx.cache[key] = retrieved_modules(ctx.index, [ctx.query(x) for x, _ in ctx.shots], ctx.settings.k)
    return ctx.cache[key]


@contextlib.contextmanager
def folded(model: torch.nn.Module, adapter: le.LoraAdapter):
    """The adapter's dW added into the base weights for the block (`le.merge_into_base`: a static merge as it is
    deployed, no LoRA path at inference), the touched weights restored bit for bit on exit, errors too."""
    saved = {path: model.get_submodule(path).weight.detach().clone() for path in adapter.modules}
    try:
        yield le.merge_into_base(model, adapter)
    finally:
        with torch.no_grad():
            for path, weight in saved.items():
                model.get_submodule(path).weight.copy_(weight)


def merged(ctx: Context, names: list[str], weights: list[float], method: str, **options) -> MethodOutput:
    """A static merge of `names`, answered with it folded into the base: a dense result (TIES, DARE) has the
    numerical rank of its trimmed delta (hundreds), which attached as a LoRA would cost more than the base itself."""
    adapter = le.merge([ctx.zoo[n] for n in names], weights, method, seed=ctx.seed, name=method, **options)
    with folded(ctx.base.model, adapter):
        output = answer(ctx, [ctx.prompt(x) for x, _ in ctx.test])
    return output._replace(info={"adapters": names})


# ---- baselines -------------------------------------------------------------------------------------------------
@register_method("zero_shot", uses_shots=False)
def zero_shot(ctx: Context) -> MethodOutput:
    """The base alone, instruction + input."""
    return answer(ctx, [ctx.prompt(x) for x, _ in ctx.test])


@register_method("icl")
def icl(ctx: Context) -> MethodOutput:
    """In-context learning: the 5 shots in every prompt."""
    return answer(ctx, [ctx.prompt(x, ctx.shots) for x, _ in ctx.test])


# ---- one adapter or a fixed mix from the zoo ---------------------------------------------------------------------
@register_method("best_single")
def best_single(ctx: Context) -> MethodOutput:
    """The zoo adapter with the lowest loss on the shots (all adapters x shots in one batched forward)."""
    adapters = list(ctx.zoo)
    losses = mean_losses(ctx.base, adapters, ctx.shot_pairs())
    best = min(range(len(adapters)), key=losses.__getitem__)
    return answer_with(ctx, adapters[best], {"adapters": [adapters[best].name], "loss": losses[best]})


@register_method("uniform_all", uses_shots=False)
def uniform_all(ctx: Context) -> MethodOutput:
    """Uniform average of every zoo adapter (exact: sum_i dW_i / N, concatenated ranks)."""
    names = ctx.zoo.names
    return merged(ctx, names, [1 / len(names)] * len(names), "task_arithmetic")


@register_method("uniform_retrieved")
def uniform_retrieved(ctx: Context) -> MethodOutput:
    """Uniform average of the top-k adapters retrieved for the shots' prompts."""
    names = retrieved_set(ctx)
    return merged(ctx, names, [1 / len(names)] * len(names), "task_arithmetic")


@register_method("task_arithmetic")
def task_arithmetic(ctx: Context) -> MethodOutput:
    """Task arithmetic (sum, lambda = 1) of the retrieved top-k."""
    names = retrieved_set(ctx)
    return merged(ctx, names, [1.0] * len(names), "task_arithmetic")


@register_method("ties")
def ties(ctx: Context) -> MethodOutput:
    """TIES (density 0.2, lambda = 1) of the retrieved top-k."""
    names = retrieved_set(ctx)
    return merged(ctx, names, [1.0] * len(names), "ties", density=0.2)


@register_method("dare_ties")
def dare_ties(ctx: Context) -> MethodOutput:
    """DARE + TIES (density 0.5, lambda = 1) of the retrieved top-k."""
    names = retrieved_set(ctx)
    return merged(ctx, names, [1.0] * len(names), "dare_ties", density=0.5)


# ---- per-input retrieval ---------------------------------------------------------------------------------------
def _per_input(ctx: Context, mode: str) -> MethodOutput:
    hits = retrieve(ctx.index, [ctx.query(x) for x, _ in ctx.test], ctx.settings.k)
    idx, gates = assignment(hits, ctx.zoo.names, ctx.settings.k)
    with le.attached(ctx.base.model, list(ctx.zoo)):
        output = answer(ctx, [ctx.prompt(x) for x, _ in ctx.test], idx, gates, mode)
    return output


@register_method("retrieval_mixture", uses_shots=False)
def retrieval_mixture(ctx: Context) -> MethodOutput:
    """LoRAretriever mixture: per test input its top-k adapters, outputs averaged."""
    return _per_input(ctx, "mixture")


@register_method("retrieval_fusion", uses_shots=False)
def retrieval_fusion(ctx: Context) -> MethodOutput:
    """LoRAretriever fusion: per test input its top-k adapters, factors averaged."""
    return _per_input(ctx, "fusion")


# ---- upper bounds: LoRAs trained on the held-out task itself ---------------------------------------------------
@register_method("upper_task_lora", uses_shots=False)
def upper_task_lora(ctx: Context) -> MethodOutput:
    """Upper bound: a LoRA trained on the held-out task's own train split (the zoo's recipe)."""
    spec = default_recipe(ctx.base).train
    pairs = task_pairs(ctx.base, ctx.task.name, "train", spec.steps * spec.rows_per_adapter, seed=spec.seed)
    with torch.enable_grad():
        (adapter,), _ = train_adapters(ctx.base, {ctx.task.name: pairs}, spec, progress=False)
    return answer_with(ctx, adapter)


@register_method("upper_shots_lora")
def upper_shots_lora(ctx: Context) -> MethodOutput:
    """A LoRA trained on the 5 shots alone; the adapters of all seeds are trained jointly on the first seed."""
    key = ("shots_lora", ctx.task.name)
    if key not in ctx.cache:
        datasets = {f"seed{s}": ctx.shot_pairs(ctx.shots_of(s)) for s in ctx.seeds}
        with torch.enable_grad():
            adapters, _ = train_adapters(ctx.base, datasets, replace(shots_spec(ctx.base), seed=ctx.seeds[0]), progress=False)
        ctx.cache[key] = dict(zip(datasets, adapters))
    return answer_with(ctx, ctx.cache[key][f"seed{ctx.seed}"])


# ---- LoraHub: gradient-free weights for 20 modules on the 5 shots ----------------------------------------------
LORAHUB_MODULES = 20  # LoraHub's default number of composed modules


def _lorahub(ctx: Context, names: list[str]) -> MethodOutput:
    """LoraHub's search (budget 40, w in [-1.5, 1.5], l1 0.05, NGOpt) on the shots; answers with the composition."""
    result = lorahub_search(ctx.base.model, ctx.base.tokenizer, [ctx.zoo[n] for n in names], ctx.shot_pairs(),
                            optimizer="NGOpt", population=1, seed=ctx.seed, progress=False)
    return answer_with(ctx, result.adapter(), {"adapters": names, "weights": list(result.weights.values()),
                                               "loss": result.loss, "zero_loss": result.history[0].loss})


@register_method("lorahub")
def lorahub(ctx: Context) -> MethodOutput:
    """LoraHub as published: 20 modules drawn at random (seeded), weights searched on the shots."""
    return _lorahub(ctx, random_modules(ctx.zoo.names, min(LORAHUB_MODULES, len(ctx.zoo)), seed=ctx.seed))


@register_method("retrieval_lorahub")
def retrieval_lorahub(ctx: Context) -> MethodOutput:
    """LoraHub's search over the 20 modules retrieved for the shots' prompts."""
    return _lorahub(ctx, retrieved_modules(ctx.index, [ctx.query(x) for x, _ in ctx.shots], LORAHUB_MODULES))
