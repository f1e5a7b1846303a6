"""The grouped-op benchmark (benchmarks/bench_grouped.py): its cases, timings and report."""
