"""Smoke run of benchmarks/search_quality.py on the shipped tiny base: a planted problem's score is the share of the
base-to-teacher gap, from the CEs it records; Adam gets a third of a search's budget in steps; the JSON is resumed (a
rerun adds nothing it holds)."""

import json

import pytest

from benchmarks import search_quality
from lorahub_engine.search.config import GRADIENT_STEP_COST


def test_planted_problem_scores_the_share_of_the_gap_and_resumes(one_thread, tmp_path):
    out = tmp_path / "quality.json"
    argv = ["--n", "3", "--budgets", "6", "--seeds", "1", "--first-seed", "0", "--settings", "lorahub",
            "cma_random", "adam", "--out", str(out)]
    search_quality.main(argv)
    runs = json.loads(out.read_text())["runs"]
    assert sorted(runs) == ["adam|fusion|3|6|0", "cma_random|fusion|3|6|0", "lorahub|fusion|3|6|0"]
    assert runs["adam|fusion|3|6|0"]["evaluations"] == 6 // GRADIENT_STEP_COST
    assert runs["lorahub|fusion|3|6|0"]["evaluations"] == 6
    for r in runs.values():
        assert r["share"] == pytest.approx((r["ce0"] - r["ce_found"]) / (r["ce0"] - r["ce_teacher"]))
    assert runs["lorahub|fusion|3|6|0"]["ce0"] == runs["cma_random|fusion|3|6|0"]["ce0"]  # one problem, two searches
    before = out.read_text()
    search_quality.main(argv)
    assert json.loads(out.read_text())["runs"] == json.loads(before)["runs"]
