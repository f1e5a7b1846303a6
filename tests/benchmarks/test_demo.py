"""The README demo end to end on the shipped tiny base and zoo (nothing trained or downloaded), and its CLI."""

import pytest

from benchmarks import bases, zoo
from benchmarks.demo import run_demo
from lorahub_engine.cli import build_parser


def test_demo_composes_retrieved_adapters_that_beat_the_zero_shot_base(one_thread, monkeypatch, capsys):
    monkeypatch.setattr(bases, "build_tiny", lambda *a, **k: pytest.fail("the shipped tiny base must be used"))
    monkeypatch.setattr(zoo, "build_zoo", lambda *a, **k: pytest.fail("the shipped tiny zoo must be used"))
    result = run_demo(progress=False)
    out = capsys.readouterr().out
    assert result["task"] == "navigate"
    assert len(result["adapters"]["uniform_retrieved"]) == 3 and len(result["adapters"]["retrieval_lorahub"]) == 20
    for method in ("uniform_retrieved", "retrieval_lorahub"):
        assert result["composed"][method] > result["zero_shot"] + 0.1
        assert f"{method}:" in out
    assert "zero-shot base:" in out and "100 test examples" in out


def test_demo_refuses_a_training_task():
    with pytest.raises(ValueError, match="training task"):
        run_demo(task="plural", progress=False)


def test_cli_parses_the_benchmark_commands():
    parser = build_parser()
    args = parser.parse_args(["bench", "cross-task", "--base", "tiny", "--quick", "--methods", "zero_shot", "icl",
                              "--extra-tasks", "my.tasks"])
    assert args.quick and args.methods == ["zero_shot", "icl"] and args.extra_tasks == ["my.tasks"]
    assert args.seeds is None and args.n_test is None and args.threads == 1  # the base's preset decides
    args = parser.parse_args(["build-zoo", "--base", "smollm2", "--out", "z"])
    assert args.base == "smollm2" and args.out == "z"
    args = parser.parse_args(["demo", "--task", "count_even", "--k", "2"])
    assert args.task == "count_even" and args.k == 2 and args.methods == ["uniform_retrieved", "retrieval_lorahub"]
