"""lorahub_search: LoraHub's search for the weights of a composition (Huang et al. 2023), by default with Adam through
the grouped op's backward instead of its gradient-free optimizer (`SearchConfig.lorahub()`, optimizer="NGOpt").

    result = lorahub_search(model, tokenizer, adapters, [("input", "answer"), ...], seed=0)
    result.weights, result.loss          # best weights per adapter, its objective
    result.adapter().save("composed")    # the composition as one PEFT adapter

LoraHub merges full state dicts and reruns the model for each of its 40 evaluations. Here the adapters are
attached once and a candidate only sets the fusion gates (see objective.py); with population=P, P candidates are
asked, evaluated in one batched forward, and told together. population=1 is LoraHub's sequential loop. With
optimizer="adam" (the default) the gates require grad and each step is one forward and backward of the examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorahub_engine.adapter import LoraAdapter
from lorahub_engine.search.answers import answers_for
from lorahub_engine.search.config import DEFAULTS, SearchConfig
from lorahub_engine.search.errors import SearchError
from lorahub_engine.search.inputs import check_adapters, check_examples, composing
from lorahub_engine.search.loop import check_search, evaluate, search_history
from lorahub_engine.search.objective import FewShotObjective, encode_pairs
from lorahub_engine.search.result import SearchResult
from lorahub_engine.search.validate import cross_validate, folds_of


def lorahub_search(model, tokenizer, adapters: Sequence[LoraAdapter], examples: Sequence[tuple[str, str]], *,
                   budget: int = DEFAULTS.budget, bound: float = DEFAULTS.bound, l1: float = DEFAULTS.l1,
                   optimizer: str = DEFAULTS.optimizer, population: int | None = DEFAULTS.population,
                   start: str = DEFAULTS.start, step: float = DEFAULTS.step, seed: int = DEFAULTS.seed,
                   mode: str = DEFAULTS.mode, folds: int = DEFAULTS.folds, validate: str = DEFAULTS.validate,
                   batch_size: int | None = DEFAULTS.batch_size, lr: float = DEFAULTS.lr,
                   progress: bool = True) -> SearchResult:
    """Search weights w in [-bound, bound]^N minimizing mean answer CE + l1 * mean |w| (defaults: `DEFAULTS`).

    model: a transformers causal or seq2seq LM without adapters attached; it is left as it was (adapters
        detached, train/eval mode restored), on error too.
    adapters: the N LoraAdapter to compose (LoraHub: 20). examples: (input, answer) pairs; the input is the
        prompt as the model reads it.
    mode: "fusion" mixes the adapters' factors (LoraHub); "mixture" applies each adapter's delta with its weight.
    optimizer: "adam" (default) descends the gradient through the grouped op (learning rate `lr`; each step costs
        GRADIENT_STEP_COST = 3 evaluations of the budget; result.history holds its steps); else "cma" or a
        nevergrad optimizer name, gradient-free: LoraHub's own setting is optimizer="NGOpt", start="zero",
        population=1 (`SearchConfig.lorahub()`). population: candidates per batched forward (None: the
        optimizer's own); start: "zero", "random" or "single"; step: cma's initial step size.
    folds: k >= 2 validates on the examples first (k-fold, leave-one-out when k >= n): it picks l1 and the number
        of evaluations of the final search, or returns w = 0 or the best single adapter when no search beats them
        on held-out examples (`result.validation` records the comparison). 0 (default): search once.
    validate: what "beats" means with folds: "exact_match_fallback" (default) answers more held-out examples right
        (greedy answers, normalized exact match), ties going to w = 0, then the single adapter, then the lower
        held-out CE; "exact_match" the same with CE breaking every tie; "cross_entropy" has the lower held-out CE.
    budget: objective evaluations in all; batch_size: rows per forward (default: all P x n rows).
    """
    config = SearchConfig(budget=budget, bound=bound, l1=l1, optimizer=optimizer, population=population,
                          start=start, step=step, seed=seed, mode=mode, folds=folds, validate=validate,
                          batch_size=batch_size, lr=lr)
    return search_with(model, tokenizer, adapters, examples, config, progress)


def search_with(model, tokenizer, adapters: Sequence[LoraAdapter], examples: Sequence[tuple[str, str]],
                config: SearchConfig, progress: bool = True) -> SearchResult:
    """lorahub_search with its settings as one SearchConfig."""
    adapters, examples = check_adapters(adapters, "lorahub_search"), check_examples(examples, "lorahub_search")
    names = [a.name for a in adapters]
    try:
        batch = encode_pairs(model, tokenizer, examples)
    except ValueError as e:  # e.g. an answer that encodes to no tokens
        raise SearchError(f"cannot encode the examples: {e}") from None
    check_search(config, len(adapters))  # an unknown optimizer fails before anything is attached
    if config.folds:
        folds_of(len(examples), config.folds)  # too few examples to validate: fails here too
    choice, final = None, config
    with composing(model, adapters):
        objective = FewShotObjective(model, batch, config.batch_size, config.mode)
        if config.folds:
            answers = answers_for(config.validate, model, tokenizer, examples, config.mode, config.batch_size)
            choice = cross_validate(objective, lambda fold, l1: search_history(fold, config.replace(l1=l1), False),
                                    config.history_length, config.folds, answers=answers,
                                    prefer_fallbacks=config.validate == "exact_match_fallback")
        if choice is None or choice.kind == "search":
            if choice is not None:  # the l1 and number of evaluations that validation picked
                final = config.replace(l1=choice.l1).with_history_length(choice.evaluations)
            history = search_history(objective, final, progress)
        else:  # a fallback: its one evaluation under the configured objective
            weights = torch.zeros(1, len(adapters), dtype=torch.float64)
            if choice.kind == "single":
                weights[0, choice.adapter] = 1.0
            history = evaluate(objective, weights, config.l1)
    best = min(history, key=lambda e: e.loss)  # min keeps the earliest of equal losses
    return SearchResult(names=names, weights=dict(zip(names, best.weights)), loss=best.loss,
                        cross_entropy=best.cross_entropy, history=history, config=final, adapters=adapters,
                        validation=None if choice is None else choice.to_json())
