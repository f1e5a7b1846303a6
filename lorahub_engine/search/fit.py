"""fit_weights: the N composition weights learned by gradient descent through the grouped op's backward.

    result = le.fit_weights(model, tokenizer, adapters, examples, mode="fusion", steps=40, lr=0.1, seed=0)
    result.weights, result.adapter()                 # as lorahub_search returns them
    le.fit_weights(..., unlabeled_inputs, loss="entropy")   # AdaMerging: no answers needed

Only the N weights train: they are the gates of a learnable routing (`le.routing` with gates that require grad),
the adapters and the base stay frozen. loss="cross_entropy" minimizes the answer CE of the examples + l1 mean |w|
(LoraHub's objective, Adam instead of a gradient-free search); loss="entropy" minimizes the mean entropy of the
first answer token's distribution on unlabeled inputs (AdaMerging, Yang et al. ICLR 2024,
https://arxiv.org/abs/2310.02575). folds >= 2 validates as lorahub_search does (validate.py): k-fold over the
examples picks l1 and the number of steps, or falls back to w = 0 / the best single adapter, by held-out exact match
(validate="exact_match_fallback", the default: ties go to the fallbacks; "exact_match": cross-entropy breaks ties)
or cross-entropy (validate="cross_entropy").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lorahub_engine.adapter import LoraAdapter
from lorahub_engine.fewshot import IGNORE, Batch, example_losses, positions
from lorahub_engine.search.answers import answers_for
from lorahub_engine.search.config import FitConfig
from lorahub_engine.search.descent import descend
from lorahub_engine.search.errors import SearchError
from lorahub_engine.search.inputs import check_adapters, check_examples, composing
from lorahub_engine.search.loop import evaluate
from lorahub_engine.search.objective import FewShotObjective, encode_pairs
from lorahub_engine.search.result import SearchResult
from lorahub_engine.search.validate import cross_validate, folds_of

def fit_weights(model, tokenizer, adapters: Sequence[LoraAdapter], examples, *, mode: str = "fusion",
                steps: int = FitConfig.steps, lr: float = FitConfig.lr, l1: float = FitConfig.l1,
                bound: float = FitConfig.bound, loss: str = "cross_entropy", init: float = FitConfig.init,
                folds: int = 0, validate: str = FitConfig.validate, seed: int = 0,
                progress: bool = True) -> SearchResult:
    """Learn the weights of the N adapters' composition by Adam on the examples; returns a SearchResult whose
    history holds every step's point (before its update) and objective.

    examples: (input, answer) pairs, or with loss="entropy" plain input strings (answers, if given, are unused).
    The model is left as it was (adapters detached, mode restored, its parameters' requires_grad untouched).
    """
    config = FitConfig(steps=steps, lr=lr, l1=l1, bound=bound, mode=mode, loss=loss, init=init, seed=seed,
                       folds=folds, validate=validate)
    adapters = check_adapters(adapters, "fit_weights")
    pairs, batch = _encode(model, tokenizer, examples, config.loss)
    if config.folds:
        folds_of(batch.input_ids.shape[0], config.folds)  # too few examples to validate: fails before attaching
    names = [a.name for a in adapters]
    choice, final = None, config
    with composing(model, adapters):
        row_losses = example_losses if config.loss == "cross_entropy" else first_token_entropy
        objective = FewShotObjective(model, batch, mode=config.mode, row_losses=row_losses)
        if config.folds:
            answers = answers_for(config.validate, model, tokenizer, pairs, config.mode)
            choice = cross_validate(objective, lambda fold, l1: descend(fold, config.replace(l1=l1), False),
                                    config.steps, config.folds, answers=answers,
                                    prefer_fallbacks=config.validate == "exact_match_fallback")
        if choice is None or choice.kind == "search":
            if choice is not None:
                final = config.replace(l1=choice.l1, steps=choice.evaluations)
            history = descend(objective, final, progress)
        else:
            weights = torch.zeros(1, len(adapters), dtype=torch.float64)
            if choice.kind == "single":
                weights[0, choice.adapter] = 1.0
            history = evaluate(objective, weights, config.l1)
    best = min(history, key=lambda e: e.loss)
    return SearchResult(names=names, weights=dict(zip(names, best.weights)), loss=best.loss,
                        cross_entropy=best.cross_entropy, history=history, config=final, adapters=adapters,
                        validation=None if choice is None else choice.to_json())


def first_token_entropy(model, batch: Batch) -> torch.Tensor:
    """[n] entropy (nats) of each row's distribution over its first answer token; the batch's answers are only
    placeholders (their first token's position is what matters)."""
    if batch.is_seq2seq:
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=batch.labels)[:, :1]  # [n, 1]
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       decoder_input_ids=decoder_input_ids).logits[:, 0]  # [n, v]
    else:
        first = (batch.labels != IGNORE).float().argmax(-1)  # [n] first answer position of each row
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=positions(batch.attention_mask)).logits  # [n, l, v]
        logits = logits[torch.arange(len(first)), first - 1]  # [n, v]: the position that predicts it
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def _encode(model, tokenizer, examples, loss: str) -> tuple[list[tuple[str, str]], Batch]:
    """The checked (input, answer) pairs and their batch; with loss="entropy" inputs only, each answer a placeholder
    (eos) after its prompt."""
    examples = list(examples)
    if loss == "entropy":
        if tokenizer.eos_token_id is None:
            raise SearchError("loss='entropy' needs a tokenizer with an eos token (the answer placeholder)")
        examples = [(e, "") if isinstance(e, str) else e for e in examples]
    pairs = check_examples(examples, "fit_weights")
    if loss == "entropy":
        pairs = [(x, "") for x, _ in pairs]
    try:
        return pairs, encode_pairs(model, tokenizer, pairs)
    except ValueError as e:  # e.g. an answer that encodes to no tokens
        raise SearchError(f"cannot encode the examples: {e}") from None
