"""The benchmark harness: named workloads, each measured against its baselines in one run."""
