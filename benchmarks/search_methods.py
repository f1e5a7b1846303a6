"""Cross-task rows of issue 12: the LoraHub search (NGOpt, as these rows were measured), validated on the shots, in
the factor ("fusion") and the exact ("mixture") space; weights fitted by gradient descent; AdaMerging's entropy fit;
the engine's default search (optimizer="adam" since session 16), plain and validated.

Every row composes the 20 modules retrieved for the shots' prompts (as `retrieval_lorahub`, today's best search
row) and answers the test inputs with the composition. Validation (folds=5) is leave-one-out over the 5 shots: it
picks l1 and the number of evaluations (or steps), or falls back to w = 0 / the best single adapter. The first rows
(`*_validated`) rank those options by held-out cross-entropy (validate="cross_entropy", the rule they were measured
with); the `*_validated_em` rows by held-out exact match of the greedy answers, CE breaking ties (the default); the
`*_validated_fallback` rows the same with exact-match ties going to w = 0, then the single adapter
(validate="exact_match_fallback": a search must answer more held-out shots right than the base).
"""

from __future__ import annotations

from benchmarks.harness import Context, MethodOutput, register_method
from benchmarks.methods import LORAHUB_MODULES, answer_with
from lorahub_engine.search import fit_weights, lorahub_search, retrieved_modules

FIT_STEPS = 20  # a forward + backward per step, ~ the time of LoraHub's 40 evaluations (forwards) of the shots
LORAHUB = {"optimizer": "NGOpt", "population": 1}  # LoraHub's optimizer, which the search rows were measured with
UNLABELED = 25  # AdaMerging: test inputs read without their answers (transductive, as in the paper)


def _modules(ctx: Context) -> list[str]:
    key = ("retrieved_modules", ctx.task.name, ctx.seed)
    if key not in ctx.cache:
        ctx.cache[key] = retrieved_modules(ctx.index, [ctx.query(x) for x, _ in ctx.shots], LORAHUB_MODULES)
    return ctx.cache[key]


def _answer(ctx: Context, names: list[str], result) -> MethodOutput:
    info = {"adapters": names, "weights": list(result.weights.values()), "loss": result.loss,
            "validation": result.validation}
    return answer_with(ctx, result.adapter(), info)


def _search(ctx: Context, **options) -> MethodOutput:
    names = _modules(ctx)
    result = lorahub_search(ctx.base.model, ctx.base.tokenizer, [ctx.zoo[n] for n in names], ctx.shot_pairs(),
                            seed=ctx.seed, progress=False, **options)
    return _answer(ctx, names, result)


def _fit(ctx: Context, examples, **options) -> MethodOutput:
    names = _modules(ctx)
    result = fit_weights(ctx.base.model, ctx.base.tokenizer, [ctx.zoo[n] for n in names], examples, seed=ctx.seed,
                         steps=FIT_STEPS, progress=False, **options)
    return _answer(ctx, names, result)


@register_method("search_default")
def search_default(ctx: Context) -> MethodOutput:
    """The engine's default search (SearchConfig(): Adam through the op) over the 20 retrieved modules, no
    validation."""
    return _search(ctx)


@register_method("search_validated")
def search_validated(ctx: Context) -> MethodOutput:
    """LoraHub's search (NGOpt), validated leave-one-out on the shots by held-out CE (l1, evaluations, or a
    fallback)."""
    return _search(ctx, **LORAHUB, folds=5, validate="cross_entropy")


@register_method("search_validated_em")
def search_validated_em(ctx: Context) -> MethodOutput:
    """LoraHub's search (NGOpt), validated leave-one-out by held-out exact match of the greedy answers (CE breaks
    ties)."""
    return _search(ctx, **LORAHUB, folds=5, validate="exact_match")


@register_method("search_validated_fallback")
def search_validated_fallback(ctx: Context) -> MethodOutput:
    """LoraHub's search (NGOpt), validated leave-one-out by held-out exact match, ties going to w = 0 / the single
    adapter."""
    return _search(ctx, **LORAHUB, folds=5, validate="exact_match_fallback")


@register_method("search_adam_validated")
def search_adam_validated(ctx: Context) -> MethodOutput:
    """The default search, `lorahub_search(optimizer="adam")`: Adam through the grouped op (lr 0.3, budget 40 = 13
    steps), validated leave-one-out by held-out exact match, ties going to w = 0 / the single adapter."""
    return _search(ctx, folds=5, optimizer="adam", validate="exact_match_fallback")


@register_method("search_mixture_validated")
def search_mixture_validated(ctx: Context) -> MethodOutput:
    """LoraHub's validated search in the exact space: weights of sum_i w_i dW_i (mode="mixture")."""
    return _search(ctx, **LORAHUB, folds=5, mode="mixture", validate="cross_entropy")


@register_method("fit_fusion_validated")
def fit_fusion_validated(ctx: Context) -> MethodOutput:
    """le.fit_weights (Adam through the grouped op's backward) on the shots, factor mix, validated by held-out CE."""
    return _fit(ctx, ctx.shot_pairs(), mode="fusion", folds=5, validate="cross_entropy")


@register_method("fit_fusion_validated_em")
def fit_fusion_validated_em(ctx: Context) -> MethodOutput:
    """le.fit_weights on the shots, factor mix, validated by held-out exact match (CE breaks ties)."""
    return _fit(ctx, ctx.shot_pairs(), mode="fusion", folds=5, validate="exact_match")


@register_method("fit_fusion_validated_fallback")
def fit_fusion_validated_fallback(ctx: Context) -> MethodOutput:
    """le.fit_weights on the shots, factor mix, validated by held-out exact match, ties going to the fallbacks."""
    return _fit(ctx, ctx.shot_pairs(), mode="fusion", folds=5, validate="exact_match_fallback")


@register_method("fit_mixture_validated")
def fit_mixture_validated(ctx: Context) -> MethodOutput:
    """le.fit_weights on the shots, exact sum of deltas, validated by held-out CE."""
    return _fit(ctx, ctx.shot_pairs(), mode="mixture", folds=5, validate="cross_entropy")


@register_method("adamerging")
def adamerging(ctx: Context) -> MethodOutput:
    """AdaMerging: mixture weights minimizing the first answer token's entropy on 25 unlabeled test inputs."""
    inputs = [ctx.prompt(x) for x, _ in ctx.test[:UNLABELED]]
    return _fit(ctx, inputs, mode="mixture", loss="entropy", l1=0.0)
