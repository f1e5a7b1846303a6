"""validation_choices on a hand-made runs file: counts per option, the counterfactual rule and its scores."""

import json

import pytest

from benchmarks.validation_choices import main, summarize, ties_to_fallback

SEARCH = "l1=0.05 evaluations=40"


def scores(zero, single, search):
    """held_out of three options from (exact match, cross-entropy) pairs."""
    return {name: {"exact_match": em, "cross_entropy": ce} for name, (em, ce) in
            (("zero", zero), ("single", single), (SEARCH, search))}


def run(score, kind, held_out):
    extra = {"l1": 0.05, "evaluations": 40} if kind == "search" else {"l1": None, "evaluations": None}
    return {"score": score, "info": {"validation": {"kind": kind, "adapter": None, **extra, "held_out": held_out}}}


RUNS = {
    "t|zero_shot|0": {"score": 0.7, "info": {}},
    # exact match ties between w = 0 and the search, CE picked the search: the counterfactual sends it to w = 0
    "t|em|0": run(0.5, "search", scores((0.8, 0.9), (0.6, 0.5), (0.8, 0.4))),
    # the search answers more right: both rules agree
    "t|em|1": run(0.6, "search", scores((0.4, 0.9), (0.6, 0.5), (0.8, 0.4))),
    # the single adapter ties the search, w = 0 is worse: the counterfactual picks the single adapter, not run
    "u|em|0": run(0.3, "search", scores((0.0, 0.9), (0.6, 0.5), (0.6, 0.4))),
    "t|ce|0": {"score": 0.4, "info": {"validation": {"kind": "zero", "held_out": {"zero": 0.5, SEARCH: 0.6}}}},
}


def test_ties_go_to_the_fallbacks_in_order_then_the_lowest_cross_entropy():
    assert ties_to_fallback(scores((0.8, 0.9), (0.8, 0.5), (0.8, 0.4))) == "zero"
    assert ties_to_fallback(scores((0.2, 0.9), (0.8, 0.5), (0.8, 0.4))) == "single"
    assert ties_to_fallback(scores((0.2, 0.9), (0.4, 0.5), (0.8, 0.4))) == SEARCH


def test_a_margin_keeps_w0_until_an_option_beats_it_by_more():
    held = scores((0.4, 0.9), (0.4, 0.5), (0.8, 0.4))  # the search answers two more shots of five
    assert ties_to_fallback(held, margin=0.2) == SEARCH
    assert ties_to_fallback(held, margin=0.4) == "zero"  # 0.8 - 0.4 is not more than 0.4
    assert ties_to_fallback(scores((0.4, 0.9), (0.8, 0.5), (0.6, 0.4)), margin=0.2) == "single"
    rows = {(r["method"], r["task"]): r for r in summarize(RUNS, margin=0.4)}
    assert rows["em", "t"]["to_zero"] == 2 and rows["em", "t"]["fallback_mean"] == pytest.approx(0.7)


def test_summary_counts_choices_and_scores_the_counterfactual(tmp_path, capsys):
    rows = {(r["method"], r["task"]): r for r in summarize(RUNS)}
    assert set(rows) == {("em", "t"), ("em", "u"), ("ce", "t")}
    em = rows["em", "t"]
    assert em["kinds"] == {"search": 2, "single": 0, "zero": 0} and em["mean"] == pytest.approx(0.55)
    assert em["to_zero"] == 1 and em["unknown"] == 0 and em["fallback_mean"] == pytest.approx(0.65)
    assert rows["em", "u"]["unknown"] == 1 and rows["em", "u"]["fallback_mean"] is None
    assert rows["ce", "t"]["kinds"]["zero"] == 1 and rows["ce", "t"]["fallback_scores"] == []
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"key": {}, "runs": RUNS}))
    assert main([str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == ["| ce | t | 0 / 0 / 1 | 0.400 | - |",
                                                        "| em | t | 2 / 0 / 0 | 0.550 | 1, 0.650 (0) |",
                                                        "| em | u | 1 / 0 / 0 | 0.300 | 0, - (1) |"]
