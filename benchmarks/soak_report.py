"""The soak benchmark's measurements and report: the server's memory and CPU from /proc, the
device-memory gauges it exports, and the summary of every request (counts, latency windows).

Memory is read from /proc (Linux) rather than through psutil, which the project does not
depend on. An engine child process (`--engine-process`) is found through the kernel's
per-thread `children` lists, or failing that by scanning every process's parent pid.
"""

from __future__ import annotations

import os
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.soak_state import ENDPOINTS, INFERENCE, Kind, Outcome

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
# A device-memory gauge, whatever its exact name: softprompt_*{cuda,gpu,device}*{memory,bytes}*.
_DEVICE_MEMORY = re.compile(r"^softprompt_\w*(cuda|gpu|device)\w*(mem|bytes)\w*$")


def children(pid: int) -> list[int]:
    """Direct child processes of `pid`."""
    found: set[int] = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                found.update(int(c) for c in (task / "children").read_text().split())
            except OSError:
                break  # no `children` files in this kernel: scan instead
        else:
            return sorted(found)
    except OSError:
        return []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if re.search(rf"^PPid:\s+{pid}$", status, re.M):
                found.add(int(entry.name))
    return sorted(found)


def rss_bytes(pid: int) -> int | None:
    """Resident set size of one process, None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


@dataclass(frozen=True)
class MemorySample:
    """The server and each child's RSS at one moment of the soak."""

    t: float  # seconds since the soak began
    rss: dict[str, int]  # "server" or "child <pid>" -> bytes


def sample_memory(pid: int, t: float) -> MemorySample:
    rss = {"server": rss_bytes(pid) or 0}
    for child in children(pid):
        value = rss_bytes(child)
        if value is not None:
            rss[f"child {child}"] = value
    return MemorySample(t, rss)


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format as (name, labels, value) samples."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or line.startswith("#"):
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return out


def device_memory(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, float]:
    """Every device-memory gauge the server exports, keyed by name and labels."""
    out = {}
    for name, labels, value in samples:
        if _DEVICE_MEMORY.match(name):
            key = name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
                          if labels else "")
            out[key] = value
    return out


def server_5xx(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, float]:
    """The server's own count of 5xx answers, by endpoint and status."""
    out: Counter[str] = Counter()
    for name, labels, value in samples:
        if name == "softprompt_requests_total" and labels.get("status", "").startswith("5"):
            out[f"{labels.get('endpoint')} {labels['status']}"] += value
    return dict(out)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0] * 1000
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def summarize(outcomes: list[Outcome], *, duration_s: float, windows: int) -> dict[str, Any]:
    """Counts per kind and status, the unexpected outcomes, and p50/p99 latency of the
    successful inference requests per window of the run."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    by_tenant: dict[str, Counter[str]] = defaultdict(Counter)
    width = duration_s / windows
    per_window: list[list[float]] = [[] for _ in range(windows)]
    errors_per_window = [0] * windows
    unexpected = []
    latencies: dict[str, list[float]] = defaultdict(list)
    for o in outcomes:
        counts[o.kind.value][o.status] += 1
        if o.expected and o.status[:1] == "2":
            latencies[o.kind.value].append(o.latency)
        by_tenant[o.tenant][o.status] += 1
        w = min(windows - 1, max(0, int(o.started / width)))
        if not o.expected:
            errors_per_window[w] += 1
            unexpected.append({"kind": o.kind.value, "tenant": o.tenant, "status": o.status,
                               "at_s": round(o.started, 2), "detail": o.detail})
        elif o.kind in INFERENCE and o.status == "200":
            per_window[w].append(o.latency)
    five = sum(n for c in counts.values() for s, n in c.items() if s.startswith("5"))
    return {
        "counts": {k.value: dict(sorted(counts[k.value].items())) for k in Kind
                   if k.value in counts},
        "endpoints": {k.value: ENDPOINTS[k] for k in Kind},
        "latency_ms": {k: {"p50": _pct(v, 50), "p99": _pct(v, 99), "max": max(v) * 1000}
                       for k, v in latencies.items()},
        "by_tenant": {t: dict(sorted(c.items())) for t, c in sorted(by_tenant.items())},
        "requests": len(outcomes),
        "count_5xx": five,
        "unexpected_count": len(unexpected),
        "unexpected": unexpected[:100],
        "windows": [{"from_s": round(i * width, 1), "to_s": round((i + 1) * width, 1),
                     "requests": len(lat), "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
                     "unexpected": errors_per_window[i]}
                    for i, lat in enumerate(per_window)],
    }


def memory_report(start: MemorySample, end: MemorySample, peak: dict[str, int],
                  *, limit_pct: float = 5.0) -> dict[str, Any]:
    """RSS after warm-up against the end, per process and in total, with the growth check."""
    out: dict[str, Any] = {}
    names = [n for n in start.rss if n in end.rss]
    for name in [*names, "total"]:
        a = sum(start.rss[n] for n in names) if name == "total" else start.rss[name]
        b = sum(end.rss[n] for n in names) if name == "total" else end.rss[name]
        growth = (b - a) / a * 100 if a else 0.0
        out[name] = {"start_mib": a / 2**20, "end_mib": b / 2**20,
                     "peak_mib": (peak.get(name, 0) if name != "total" else
                                  peak.get("total", 0)) / 2**20,
                     "growth_pct": growth, "within_limit": growth <= limit_pct}
    out["measured_from_s"], out["measured_to_s"] = round(start.t, 1), round(end.t, 1)
    out["limit_pct"] = limit_pct
    return out


def print_report(r: dict[str, Any]) -> None:
    """The table: counts per kind and status, latency windows, memory, CPU, verdicts."""
    s = r["summary"]
    statuses = sorted({st for c in s["counts"].values() for st in c},
                      key=lambda x: (not x[:1].isdigit(), x))
    c = r["config"]
    notes = [f"{c['minutes']} min", f"{len(c['tenants'])} tenants", f"{c['clients']} clients",
             f"model {c['model']} on {c['device']}"]
    notes += ["engine process"] * c["engine_process"]
    notes += [f"{c['torch_threads']} torch threads"] * bool(c["torch_threads"])
    print(f"\nsoak: {', '.join(notes)}: {s['requests']} requests")
    print(f"\n{'kind':<20}" + "".join(f"{st:>11}" for st in statuses)
          + f"{'p50 ms':>9}{'p99 ms':>9}")
    for kind, c in s["counts"].items():
        lat = s["latency_ms"].get(kind)
        print(f"{kind:<20}" + "".join(f"{c.get(st, ''):>11}" for st in statuses)
              + (f"{lat['p50']:>9.0f}{lat['p99']:>9.0f}" if lat else ""))
    print(f"\nlatency of successful inference requests per window (ms)\n"
          f"{'window (s)':<16}{'requests':>9}{'p50':>9}{'p99':>9}{'unexpected':>11}")
    for w in s["windows"]:
        p50 = f"{w['p50_ms']:.0f}" if w["p50_ms"] is not None else "-"
        p99 = f"{w['p99_ms']:.0f}" if w["p99_ms"] is not None else "-"
        print(f"{w['from_s']:>6.1f}-{w['to_s']:<9.1f}{w['requests']:>9}{p50:>9}{p99:>9}"
              f"{w['unexpected']:>11}")
    m = r["memory"]
    print(f"\nRSS (MiB), from {m['measured_from_s']} s (after warm-up) to {m['measured_to_s']} s "
          "(after the drain)")
    for name, v in m.items():
        if isinstance(v, dict):
            print(f"  {name:<16} {v['start_mib']:8.1f} -> {v['end_mib']:8.1f}  "
                  f"peak {v['peak_mib']:8.1f}  growth {v['growth_pct']:+6.2f}% "
                  f"({'within' if v['within_limit'] else 'OVER'} {m['limit_pct']:g}%)")
    dev = r["device_memory"]
    if isinstance(dev, str):
        print(f"device memory: {dev}")
    else:
        for key, (a, b) in dev.items():
            print(f"device memory {key}: {a / 2**20:.1f} -> {b / 2**20:.1f} MiB")
    cpu = r["cpu_seconds"]
    print(f"CPU seconds: server {cpu['server']:.1f}, clients {cpu['clients']:.1f} "
          f"({cpu['clients_share_pct']:.0f}% of both)")
    left = r["after_drain"]
    print(f"after the drain: in flight {left['in_flight']:g}, queued {left['queue_depth']:g}, "
          f"parked {left['parked']:g} (target 0); server exit status {r['server_exit']}")
    print(f"busy adapters hit by the uploader: {r['ops_on_busy']}")
    h = r["healthz"]
    if h["max_ms"] is not None:
        print(f"/healthz while the hostile tenant ran: {h['probes']} probes, {h['failures']} "
              f"failed, p99 {h['p99_ms']:.1f} ms, slowest {h['max_ms']:.1f} ms (target under "
              f"{h['target_ms']:g} ms: {'met' if h['within_target'] else 'MISSED'})")
    if r["server_died_at_s"] is not None:
        print(f"THE SERVER DIED at {r['server_died_at_s']:.1f} s (see its log)")
    if r["drain_timed_out"]:
        print("the clients did not finish within the drain time after the deadline")
    print(f"\n5xx: {s['count_5xx']} (server counted {sum(r['server_5xx'].values()):g}; "
          f"target 0)   unexpected outcomes: {s['unexpected_count']} (target 0)   "
          f"server log ERROR lines: {len(r['server_log_errors'])}")
    for u in s["unexpected"][:10]:
        print(f"  at {u['at_s']} s {u['tenant']} {u['kind']}: {u['detail'][:400]}")
    print("verdict: " + ("PASS" if r["passed"] else "FAIL") + " (exit status "
          f"{0 if r['passed'] else 1}); RSS growth "
          f"{'within' if m['total']['within_limit'] else 'OVER'} {m['limit_pct']:g}%")
