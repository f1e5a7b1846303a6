"""benchmarks/bench_merge.py: its ours-vs-PEFT parity check on tiny adapters (fast, cases run in this process), and a
smoke run of the whole script (slow: seven fresh interpreters)."""

import argparse
import json

import pytest

from benchmarks import bench_merge


def run_parity_cases(tmp_path, monkeypatch, peft_weights=None):
    """The four cases the parity check compares (ours task_arithmetic r16 / cat, PEFT svd r16 / cat) on two random
    adapters of hidden 64 and one layer, run in this process; then the benchmark's own check."""
    folders = bench_merge.generate(tmp_path, 2, 1, 64)
    args = argparse.Namespace(peft_layers=1, ties_layers=1, hidden=64, threads=None)
    specs = bench_merge.cases(folders, folders, folders, args, tmp_path / "merged")
    for spec in specs:
        if spec["name"] in {name for pair in bench_merge._pairs(args).values() for name in pair}:
            if spec["kind"] == "ours":
                bench_merge.child_ours(spec)
            else:
                with monkeypatch.context() as m:
                    if peft_weights:
                        m.setattr(bench_merge, "weights", peft_weights)
                    bench_merge.child_peft(spec)
    return bench_merge.check_parity(specs, args)


def test_parity_check_passes_when_ours_equals_peft(tmp_path, monkeypatch):
    result = run_parity_cases(tmp_path, monkeypatch)
    assert set(result) == {"task_arithmetic r16 vs PEFT svd r16 (1 layers)", "cat vs PEFT cat (1 layers)"}
    assert all(diff < 1e-5 for diff in result.values())


def test_parity_check_fails_when_the_merges_differ(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="ours and PEFT's merged dW differ"):
        run_parity_cases(tmp_path, monkeypatch, peft_weights=lambda n: [1.0, 0.5][:n])  # ours uses [1.0, 0.9]


@pytest.mark.slow
def test_bench_merge_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    bench_merge.main(["--hidden", "64", "--layers", "2", "--adapters", "2", "--ties-layers", "1",
                      "--peft-layers", "1", "--threads", "1", "--workdir", str(tmp_path), "--out", str(out)])
    result = json.loads(out.read_text())
    assert len(result["cases"]) == 7 and result["cases"]["ours cat exact (all layers)"]["modules"] == 8
    assert result["cases"]["ours task_arithmetic r16 (all layers)"]["ranks"] == [16]
    assert set(result["ratios"]) == {"task_arithmetic r16 vs PEFT svd r16 (1 layers)", "cat vs PEFT cat (1 layers)"}
    assert set(result["parity_vs_peft"]) == set(result["ratios"]) and max(result["parity_vs_peft"].values()) < 1e-5
