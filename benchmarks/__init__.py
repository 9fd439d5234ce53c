"""Benchmarks: `python -m benchmarks <workload>` (see benchmarks/README.md)."""
