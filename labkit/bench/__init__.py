"""Benchmarks that print tables; run with python -m labkit.bench.NAME."""
