"""Benchmarks that write a plot (PNG under docs/img/) and its figures (JSON under
benchmarks/results/); each is one command, `python -m benchmarks.plots.<name>`."""
