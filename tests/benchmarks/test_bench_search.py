"""Smoke run of benchmarks/bench_search.py on the shipped tiny base: every way of evaluating agrees, JSON written."""

import json

import pytest

from benchmarks import bench_search


def test_bench_search_ways_agree_and_write_json(one_thread, tmp_path):
    out = tmp_path / "bench.json"
    bench_search.main(["--candidates", "4", "--repeats", "1", "--out", str(out)])  # raises if a way disagrees
    result = json.loads(out.read_text())
    zoo = result["sets"]["zoo"]
    ways = {f"{lever}_{p}" for lever in ("padded", "lengths", "prompt", "prefix", "packed", "fast", "default")
            for p in ("one_by_one", "population_8", "population_all")}
    assert set(zoo["seconds_per_candidate"]) == {"merge_and_rerun", *ways}
    assert zoo["search_speedup"] > 0 and zoo["default_setup_s"] > 0
    assert result["env"]["candidates"] == 4 and result["env"]["examples"] == 5


def test_bench_search_times_only_the_ways_asked(one_thread, tmp_path):
    out = tmp_path / "bench.json"
    bench_search.main(["--candidates", "2", "--repeats", "1", "--ways", "default_one_by_one", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["sets"]["zoo"]["seconds_per_candidate"]) == {"merge_and_rerun", "default_one_by_one"}
    assert result["env"]["ways"] == ["default_one_by_one"]
    with pytest.raises(SystemExit):
        bench_search.main(["--ways", "no_such_way"])
