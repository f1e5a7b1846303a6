"""lorahub_search: LoraHub's gradient-free search for the weights of a composition (Huang et al. 2023).

    result = lorahub_search(model, tokenizer, adapters, [("input", "answer"), ...], seed=0)
    result.weights, result.loss          # best weights per adapter, its objective
    result.adapter().save("composed")    # the composition as one PEFT adapter

LoraHub merges full state dicts and reruns the model for each of its 40 evaluations. Here the adapters are
attached once and a candidate only sets the fusion gates (see objective.py); with population=P, P candidates are
asked, evaluated in one batched forward, and told together. population=1 is LoraHub's sequential loop.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from lorahub_engine.adapter import LoraAdapter
from lorahub_engine.attach import attached
from lorahub_engine.search.config import SearchConfig
from lorahub_engine.search.errors import SearchError
from lorahub_engine.search.objective import FewShotObjective, encode_pairs, l1_penalty
from lorahub_engine.search.optimizers import AskTellOptimizer, make_optimizer
from lorahub_engine.search.result import Evaluation, SearchResult


def lorahub_search(model, tokenizer, adapters: Sequence[LoraAdapter], examples: Sequence[tuple[str, str]], *,
                   budget: int = 40, bound: float = 1.5, l1: float = 0.05, optimizer: str = "NGOpt",
                   population: int = 1, seed: int = 0, batch_size: int | None = None,
                   progress: bool = True) -> SearchResult:
    """Search weights w in [-bound, bound]^N (start w = 0) minimizing mean answer CE + l1 * mean |w|.

    model: a transformers causal or seq2seq LM without adapters attached; it is left as it was (adapters
        detached, train/eval mode restored), on error too.
    adapters: the N LoraAdapter to compose (LoraHub: 20). examples: (input, answer) pairs; the input is the
        prompt as the model reads it.
    budget: objective evaluations in all; optimizer: a nevergrad optimizer name (LoraHub: "NGOpt");
    population: candidates per batched forward; batch_size: rows per forward (default: all P x n rows).
    """
    config = SearchConfig(budget=budget, bound=bound, l1=l1, optimizer=optimizer, population=population,
                          seed=seed, batch_size=batch_size)
    adapters, examples = _check_adapters(adapters), _check_examples(examples)
    names = [a.name for a in adapters]
    try:
        batch = encode_pairs(model, tokenizer, examples)
    except ValueError as e:  # e.g. an answer that encodes to no tokens
        raise SearchError(f"cannot encode the examples: {e}") from None
    search = make_optimizer(config, len(adapters))
    try:
        with attached(model, adapters), _evaluating(model):
            objective = FewShotObjective(model, batch, config.batch_size)
            history = run_search(search, objective, config, progress)
    finally:
        search.close()
    best = min(history, key=lambda e: e.loss)  # min keeps the earliest of equal losses
    return SearchResult(names=names, weights=dict(zip(names, best.weights)), loss=best.loss,
                        cross_entropy=best.cross_entropy, history=history, config=config, adapters=adapters)


def run_search(search: AskTellOptimizer, objective: FewShotObjective, config: SearchConfig,
               progress: bool = True) -> list[Evaluation]:
    """Ask / evaluate / tell until `config.budget` evaluations; each round evaluates up to `population` at once."""
    history: list[Evaluation] = []
    rounds = math.ceil(config.budget / config.population)
    with tqdm(total=config.budget, desc="lorahub search", unit="eval", disable=not progress) as bar:
        for _ in range(rounds):
            points = torch.from_numpy(search.ask(min(config.population, config.budget - len(history))))  # [P, N]
            cross_entropy = objective.cross_entropy(points).double().cpu()  # [P]
            losses = cross_entropy + l1_penalty(points, config.l1)
            search.tell(losses.tolist())
            history += [Evaluation(tuple(w), loss, ce)
                        for w, loss, ce in zip(points.tolist(), losses.tolist(), cross_entropy.tolist())]
            bar.update(len(points))
            bar.set_postfix(best=f"{min(e.loss for e in history):.4f}")
    return history


def _check_adapters(adapters) -> list[LoraAdapter]:
    if isinstance(adapters, LoraAdapter):
        raise SearchError("lorahub_search takes a list of adapters, got a single one")
    adapters = list(adapters)
    if not adapters:
        raise SearchError("lorahub_search needs at least one adapter, got none")
    wrong = [type(a).__name__ for a in adapters if not isinstance(a, LoraAdapter)]
    if wrong:
        raise SearchError(f"adapters must be LoraAdapter objects, got {wrong[0]}")
    return adapters


def _check_examples(examples) -> list[tuple[str, str]]:
    examples = list(examples)
    if not examples:
        raise SearchError("lorahub_search needs at least one (input, answer) example, got none")
    for i, pair in enumerate(examples):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise SearchError(f"examples[{i}] must be an (input, answer) pair of strings, got {pair!r}")
    return [tuple(pair) for pair in examples]


@contextlib.contextmanager
def _evaluating(model):
    """Eval mode (no dropout) for the block; the model's previous mode afterwards."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)
