"""Smoke run of benchmarks/bench_merge.py on a tiny hidden size (slow: seven fresh interpreters)."""

import json

import pytest

from benchmarks import bench_merge


@pytest.mark.slow
def test_bench_merge_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    bench_merge.main(["--hidden", "64", "--layers", "2", "--adapters", "2", "--ties-layers", "1",
                      "--peft-layers", "1", "--threads", "1", "--workdir", str(tmp_path), "--out", str(out)])
    result = json.loads(out.read_text())
    assert len(result["cases"]) == 7 and result["cases"]["ours cat exact (all layers)"]["modules"] == 8
    assert result["cases"]["ours task_arithmetic r16 (all layers)"]["ranks"] == [16]
    assert set(result["ratios"]) == {"task_arithmetic r16 vs PEFT svd r16 (1 layers)", "cat vs PEFT cat (1 layers)"}
