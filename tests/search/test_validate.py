"""Validation over the shots: the ranking rule on hand-built scores (exact match first, cross-entropy breaking ties,
the fallbacks winning what is left), the batched held-out answers against each composition merged and decoded
alone, held-out exact match through lorahub_search / fit_weights by hand, the configs' validate option."""

import copy

import pytest
import torch

import lorahub_engine as le
from lorahub_engine.fewshot import exact_match
from lorahub_engine.search import (
    FitConfig,
    HeldOutAnswers,
    SearchConfig,
    SearchError,
    cross_validate,
    evaluate,
    fit_weights,
    lorahub_search,
)
from lorahub_engine.search.answers import MARGIN
from lorahub_engine.search.config import VALIDATIONS
from lorahub_engine.search.validate import best_option, option_name
from tests.search.conftest import EXAMPLES

pytestmark = pytest.mark.usefixtures("one_thread")
MERGE = {"fusion": "lorahub", "mixture": "task_arithmetic"}
SEARCHES = {f"l1={l1:g} evaluations={t}" for l1 in (0.05, 0.5) for t in (1, 2, 4)}


class HandObjective:
    """n shots, 2 adapters; every shot's CE under weights w is 1 - drop * (w_0 + w_1): moving away from w = 0 lowers
    it (as held-out CE rewards moving toward the answers' format)."""

    num_adapters = 2

    def __init__(self, n: int = 4, drop: float = 0.1):
        self.num_examples, self.drop = n, drop

    def example_losses(self, weights, grad=False):
        w = torch.as_tensor(weights, dtype=torch.float32)
        return (1.0 - self.drop * w.sum(-1, keepdim=True)).expand(-1, self.num_examples)  # [P, n]


def run(fold_objective, l1):
    """Four evaluations walking from w = (0.25, 0.25) to (1, 1)."""
    return evaluate(fold_objective, torch.tensor([[a, a] for a in (0.25, 0.5, 0.75, 1.0)], dtype=torch.float64), l1)


class HandAnswers:
    """Answers right exactly where `right(weights [N], shot) -> bool`; records every call's rows."""

    def __init__(self, right):
        self.right, self.calls = right, []

    def exact_match(self, weights, rows):
        self.calls.append((weights.clone(), list(rows)))
        return [bool(self.right(w, e)) for w, e in zip(weights, rows)]


def validate(answers=None, drop=0.1, folds=None, prefer_fallbacks=False):
    return cross_validate(HandObjective(drop=drop), run, length=4, folds=folds, answers=answers,
                          prefer_fallbacks=prefer_fallbacks)


def test_cross_entropy_prefers_the_search_where_exact_match_prefers_zero():
    by_ce = validate()  # l1 = 0.05: the 4th point (1, 1) has the lowest training loss and CE 0.8 held out
    assert (by_ce.kind, by_ce.l1, by_ce.evaluations) == ("search", 0.05, 4)
    assert all(score["exact_match"] is None for score in by_ce.held_out.values())
    assert by_ce.held_out["zero"]["cross_entropy"] == pytest.approx(1.0)
    assert by_ce.held_out["l1=0.05 evaluations=4"]["cross_entropy"] == pytest.approx(0.8)
    answers = HandAnswers(lambda w, e: not w.any())  # only w = 0 answers right
    by_em = validate(answers)
    assert by_em.kind == "zero" and (by_em.l1, by_em.evaluations, by_em.adapter) == (None, None, None)
    assert by_em.held_out["zero"] == {"exact_match": 1.0, "cross_entropy": pytest.approx(1.0)}
    assert all(by_em.held_out[name]["exact_match"] == 0.0 for name in {"single"} | SEARCHES)
    assert {name: s["cross_entropy"] for name, s in by_em.held_out.items()} == pytest.approx(
        {name: s["cross_entropy"] for name, s in by_ce.held_out.items()})  # both scores recorded per option
    (weights, rows), = answers.calls  # one batched call: every (option, fold, held-out shot)
    assert len(rows) == 8 * 4 and sorted(rows) == sorted(list(range(4)) * 8) and weights.shape == (32, 2)


def test_exact_match_ties_go_to_cross_entropy_then_to_the_fallbacks_in_order():
    everyone = HandAnswers(lambda w, e: True)
    tie = validate(everyone)  # exact match all 1: the lowest CE decides, a search
    assert (tie.kind, tie.l1, tie.evaluations) == ("search", 0.05, 4)
    assert validate(HandAnswers(lambda w, e: True), drop=0.0).kind == "zero"  # CE equal too: w = 0 first
    single = validate(HandAnswers(lambda w, e: bool(w.any())), drop=0.0)  # w = 0 wrong; single and searches tie
    assert single.kind == "single" and single.adapter == 0  # before any search; adapter 0 of two equal ones


def test_with_prefer_fallbacks_exact_match_ties_go_to_the_fallbacks_before_cross_entropy():
    tie = validate(HandAnswers(lambda w, e: True), prefer_fallbacks=True)  # the search has the lower CE, yet w = 0
    assert tie.kind == "zero" and tie.held_out == validate(HandAnswers(lambda w, e: True)).held_out
    single = validate(HandAnswers(lambda w, e: bool(w.any())), prefer_fallbacks=True)  # w = 0 wrong: single next
    assert single.kind == "single"
    searches = validate(HandAnswers(lambda w, e: bool((w >= 0.5).all())), prefer_fallbacks=True)  # w >= 0.5 right
    assert (searches.kind, searches.l1, searches.evaluations) == ("search", 0.05, 4)  # a strict win; CE among them
    assert best_option({"zero": {"exact_match": 0.4, "cross_entropy": 0.9},
                        "l1=0.5 evaluations=2": {"exact_match": 0.4, "cross_entropy": 0.1}}, True) == "zero"


def test_k_fold_averages_each_folds_shots_then_the_folds():
    """2 folds of 2 shots; w = 0 answers shot 0 only: 1/2 in fold 0, 0 in fold 1 -> 0.25."""
    choice = validate(HandAnswers(lambda w, e: not w.any() and e == 0), folds=2)
    assert choice.held_out["zero"]["exact_match"] == 0.25 and choice.kind == "zero"
    assert choice.held_out["single"]["exact_match"] == 0.0


def greedy_alone(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Independent greedy decoding: one prompt, no padding, no KV cache, the full sequence rerun per token."""
    ids, new = tokenizer(prompt)["input_ids"], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("mode", ["fusion", "mixture"])
def test_batched_answers_equal_each_composition_merged_and_decoded_alone(base, tokenizer, zoo, mode):
    weights = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.5, -1.0, 0.25, 1.5], [0.0, 1.0, 0.0, 0.0],
                            [1.2, 0.3, -0.7, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rows = [0, 1, 2, 1, 4, 3]  # row 3 repeats row 1 (decoded once)
    model = le.attach(copy.deepcopy(base), zoo)
    answers = HeldOutAnswers(model, tokenizer, EXAMPLES, mode)
    with torch.no_grad():
        batched = answers.answers(weights, rows)
        hits = answers.exact_match(weights, rows)
    for w, e, got, hit in zip(weights, rows, batched, hits):
        alone = le.merge_into_base(copy.deepcopy(base), le.merge(zoo, w.tolist(), MERGE[mode]))
        assert got == greedy_alone(alone, tokenizer, EXAMPLES[e][0], answers.max_new_tokens)
        assert hit == exact_match(got, EXAMPLES[e][1])
    chunked = HeldOutAnswers(model, tokenizer, EXAMPLES, mode, batch_size=2)
    with torch.no_grad():
        assert chunked.answers(weights, rows) == batched


def zero_by_hand(base, tokenizer, max_new_tokens: int) -> float:
    """Leave-one-out: w = 0's held-out exact match is the share of the shots the base alone answers right."""
    return sum(exact_match(greedy_alone(base, tokenizer, x, max_new_tokens), y) for x, y in EXAMPLES) / len(EXAMPLES)


def test_search_validated_by_exact_match_records_both_scores(base, tokenizer, zoo):
    result = lorahub_search(base, tokenizer, zoo, EXAMPLES, budget=12, folds=5, validate="exact_match",
                            optimizer="NGOpt", progress=False)
    assert result.config.validate == "exact_match"
    held = result.validation["held_out"]
    assert set(held) == {"zero", "single"} | {f"l1={l1:g} evaluations={t}" for l1 in (0.05, 0.5) for t in (3, 6, 12)}
    assert all(set(s) == {"exact_match", "cross_entropy"} and 0 <= s["exact_match"] <= 1 for s in held.values())
    longest = max(len(tokenizer(y, add_special_tokens=False)["input_ids"]) for _, y in EXAMPLES)
    assert held["zero"]["exact_match"] == pytest.approx(zero_by_hand(base, tokenizer, longest + 1 + MARGIN))
    best = max(s["exact_match"] for s in held.values())
    kind = result.validation["kind"]
    winner = kind if kind != "search" else f"l1={result.validation['l1']:g} evaluations={result.validation['evaluations']}"
    assert held[winner]["exact_match"] == best
    assert held[winner]["cross_entropy"] == min(s["cross_entropy"] for s in held.values() if s["exact_match"] == best)


def test_search_validated_by_default_with_ties_to_the_fallbacks(base, tokenizer, zoo):
    result = lorahub_search(base, tokenizer, zoo, EXAMPLES, budget=12, folds=5, progress=False)
    assert result.config.validate == "exact_match_fallback" == SearchConfig().validate == FitConfig().validate
    choice = result.validation
    held, kind = choice["held_out"], choice["kind"]
    best = max(s["exact_match"] for s in held.values())
    winner = kind if kind != "search" else option_name(choice["l1"], choice["evaluations"])
    assert held[winner]["exact_match"] == best
    if held["zero"]["exact_match"] == best:
        assert kind == "zero" and result.weights == dict.fromkeys(result.names, 0.0)
    elif kind == "search":
        assert held["single"]["exact_match"] < best


def test_fit_validated_by_exact_match_and_by_cross_entropy(base, tokenizer, zoo):
    by_em = fit_weights(base, tokenizer, zoo, EXAMPLES, steps=8, folds=5, validate="exact_match", progress=False)
    by_ce = fit_weights(base, tokenizer, zoo, EXAMPLES, steps=8, folds=5, validate="cross_entropy", progress=False)
    assert by_em.config.validate == "exact_match" and by_ce.config.validate == "cross_entropy"
    em, ce = by_em.validation["held_out"], by_ce.validation["held_out"]
    assert all(s["exact_match"] is None for s in ce.values())
    for name in em:  # the same runs, scored the same by CE
        assert em[name]["cross_entropy"] == pytest.approx(ce[name]["cross_entropy"], abs=1e-6)
    longest = max(len(tokenizer(y, add_special_tokens=False)["input_ids"]) for _, y in EXAMPLES)
    assert em["zero"]["exact_match"] == pytest.approx(zero_by_hand(base, tokenizer, longest + 1 + MARGIN))


@pytest.mark.parametrize("config", [SearchConfig(folds=3, validate="cross_entropy"), SearchConfig(folds=5),
                                    SearchConfig(folds=5, validate="exact_match_fallback"),
                                    FitConfig(folds=2, validate="cross_entropy"), FitConfig()])
def test_config_round_trip_keeps_validate(config):
    record = config.to_json()
    assert record["validate"] in VALIDATIONS
    assert type(config).from_json(record) == config


@pytest.mark.parametrize("make", [SearchConfig, FitConfig])
@pytest.mark.parametrize("value", ["accuracy", "", None, 1, ["exact_match"]])
def test_bad_validate_is_a_search_error(make, value):
    with pytest.raises(SearchError, match="validate must be one of .'exact_match', 'exact_match_fallback', "
                                          "'cross_entropy'."):
        make(folds=5, validate=value)


def test_unknown_fit_config_keys_are_refused():
    with pytest.raises(SearchError, match=r"unknown fit config keys: \['validation'\]"):
        FitConfig.from_json({"validation": "exact_match"})
