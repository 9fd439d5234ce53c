"""Benchmarks: `python -m benchmarks <workload>` (see docs/benchmarks.md)."""
