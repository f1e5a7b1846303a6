"""Benchmarks for lorahub-engine: the taskworld tasks, the base models and the scripts that measure them."""
