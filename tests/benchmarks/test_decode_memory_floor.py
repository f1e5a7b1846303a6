"""Smoke run of benchmarks/decode_memory_floor.py with a small bank: every thread count reports a bandwidth and the
two per-step times, and the adapters' bytes are what the shapes say."""

from benchmarks import decode_memory_floor as floor


def test_reports_the_read_and_the_op_per_step():
    report = floor.main(["--threads", "1", "--adapters", "2", "--rows", "4"])
    per_layer = sum(floor.RANK * (d_in + d_out) for d_in, d_out in floor.SHAPES)  # 81,408 for SmolLM2-135M
    assert report["adapter_MB_per_step"] == 2 * floor.LAYERS * per_layer * 4 / 1e6
    assert set(report[1]) == {"read_GB_per_s", "read_ms", "grouped_ms"} and all(v > 0 for v in report[1].values())
