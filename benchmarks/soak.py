"""`python -m benchmarks soak --minutes N`: the real server under mixed multi-tenant load for a
while, to catch what only shows over time or under churn: 5xx answers, leaked requests,
growing memory.

The server runs as a subprocess on loopback (builtin:tiny by default, a temporary store, three
tenants or more in an --api-keys file). Per tenant, four clients run until the time is up:
non-streaming generate; streaming generate; a mix of the OpenAI routes, streams left after a
few events, and requests for another tenant's adapter; and an uploader that uploads,
overwrites and deletes the tenant's churned adapters while the other clients use them. One more
tenant sends a hostile mix (benchmarks.soak_hostile) throughout, and a prober asks /healthz
every 50 ms. The report (a table, and JSON in benchmarks/results/soak.json) has counts per
kind and status, the slowest /healthz answer (target under 100 ms),
p50/p99 latency per tenth of the run (per minute from 10 minutes on), the server's RSS after
warm-up and at the end, device memory where the server exports it, and a verdict. Exit status
1 when any request got a 5xx or another unexpected outcome (a connection error that was not a
deliberate disconnect, a wrong status, a malformed answer) or the server did not exit cleanly;
missing the RSS target is printed but does not change the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks.soak_hostile import probe_health, run_hostile
from benchmarks.soak_report import (
    MemorySample,
    children,
    cmdline,
    cpu_seconds,
    device_memory,
    memory_report,
    parse_metrics,
    print_report,
    sample_memory,
    server_5xx,
    summarize,
)
from benchmarks.soak_state import AdapterFiles, Tenant, Traffic
from benchmarks.soak_traffic import run_tenant

VIRTUAL_TOKENS = (1, 3, 8, 16, 32, 64)  # the uploaded adapters' sizes, varied
STABLE, CHURNED = 2, 4  # adapters per tenant: never touched / uploaded, replaced, deleted
CLIENTS_PER_TENANT = 4
RSS_LIMIT_PCT = 5.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks soak",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0,
                   help="how long traffic runs (fractions allowed, e.g. 0.2; default 10)")
    p.add_argument("--model", default="builtin:tiny", help="the server's --model")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="the server's --device (default cpu)")
    p.add_argument("--engine-process", action="store_true",
                   help="the server runs its engine in a child process (--engine-process)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="the server's --torch-threads (default 0: the server's automatic "
                        "sizing, which leaves a core to its HTTP process). On a small machine "
                        "the clients share the cores too; 1 leaves them one")
    p.add_argument("--tenants", type=int, default=3, help="tenants, at least 3 (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=48,
                   help="requests ask for 1 to this many tokens (default 48)")
    p.add_argument("--seed", type=int, default=0, help="seed of the traffic mix (default 0)")
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the JSON (default benchmarks/results/soak.json); the "
                        "server's log goes beside it")
    p.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                   help="one more argument for `serve` (repeatable), e.g. "
                        "--server-flag=--max-batch-size --server-flag=8")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tenants < 3:
        raise SystemExit("--tenants must be at least 3")
    if args.minutes <= 0:
        raise SystemExit("--minutes must be positive")
    out = args.json or Path(__file__).resolve().parent / "results" / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run_soak(minutes=args.minutes, model=args.model, device=args.device,
                      engine_process=args.engine_process, torch_threads=args.torch_threads,
                      tenants=args.tenants,
                      max_new_tokens=args.max_new_tokens, seed=args.seed,
                      log_path=out.with_suffix(".server.log"), server_flags=args.server_flag)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    print(f"\nJSON: {out}\nserver log: {result['server_log']}")
    return 0 if result["passed"] else 1


def _tenants(count: int) -> list[tuple[str, str]]:
    return [(f"tenant-{chr(ord('a') + i)}" if i < 26 else f"tenant-{i}", f"soak-key-{i}")
            for i in range(count)]


HOSTILE = ("tenant-hostile", "soak-key-hostile")


def _keys_file(path: Path, tenants: list[tuple[str, str]]) -> None:
    """The first tenant weighs 2; the last may run only 2 requests at once, so it meets its
    quota (429) and the quota's bookkeeping is soaked too, disconnects included. The hostile
    tenant has no quota: its heavy requests should be served, not refused."""
    entries: list[dict[str, Any]] = [{"name": HOSTILE[0], "keys": [HOSTILE[1]]}]
    for i, (name, key) in enumerate(tenants):
        entry: dict[str, Any] = {"name": name, "keys": [key]}
        if i == 0:
            entry["weight"] = 2
        if i == len(tenants) - 1:
            entry["quotas"] = {"max_concurrent_requests": 2}
        entries.append(entry)
    path.write_text(json.dumps({"tenants": entries}))


def _adapter_variants(root: Path, model: str) -> list[AdapterFiles]:
    """Real PEFT-format adapters from the repo's sample maker, one per size."""
    from server.config import Settings
    from server.sample_adapter import write_sample_adapter

    cache = Settings().model_cache  # where the server finds (or builds) a builtin model too
    quiet = logging.getLogger("server.engine.builtin")  # its warning, once per adapter
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return [AdapterFiles.read(write_sample_adapter(root / f"n{n}", model=model,
                                                       model_cache=cache,
                                                       num_virtual_tokens=n, seed=n), n)
                for n in VIRTUAL_TOKENS]
    finally:
        quiet.setLevel(level)


def _upload_all(url: str, tenants: list[Tenant], variants: list[AdapterFiles]) -> None:
    """Every tenant's stable and churned adapters, before the clock starts."""
    by_size = {v.num_virtual_tokens: v for v in variants}
    for t in tenants:
        with httpx.Client(base_url=url, timeout=60,
                          headers={"Authorization": f"Bearer {t.key}"}) as c:
            wanted = [*t.stable.items(),
                      *((a, VIRTUAL_TOKENS[i % len(VIRTUAL_TOKENS)]) for i, a in
                        enumerate(t.churn))]
            for adapter, n in wanted:
                files = by_size[n]
                r = c.post("/v1/adapters", data={"adapter_id": adapter},
                           files={"config": ("adapter_config.json", files.config),
                                  "weights": ("adapter_model.safetensors", files.weights)})
                if r.status_code != 201:
                    raise RuntimeError(f"setup upload of {adapter}: {r.status_code} {r.text}")


async def _warm_up(url: str, tenants: list[Tenant]) -> None:
    """Each stable adapter resident and each route compiled once, before anything is timed."""
    for t in tenants:
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     headers={"Authorization": f"Bearer {t.key}"}) as c:
            for adapter in [None, *t.stable]:
                for stream in (False, True):
                    body = {"adapter_id": adapter, "text": "warm up", "max_new_tokens": 4,
                            "stream": stream}
                    r = await c.post("/v1/generate", json=body)
                    if r.status_code not in (200, 429):
                        raise RuntimeError(f"warm-up {body}: {r.status_code} {r.text}")


async def _scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    try:
        async with httpx.AsyncClient(timeout=10) as c:
            return parse_metrics((await c.get(url + "/metrics")).text)
    except httpx.HTTPError:
        return []


def _gauge(samples: list[tuple[str, dict[str, str], float]], name: str) -> float:
    return sum(v for n, _, v in samples if n == name)


async def _soak(url: str, pid: int, traffic: Traffic, *, hostile: Tenant, warm_s: float,
                seed: int, alive: Callable[[], bool]) -> dict[str, Any]:
    """The clients until the deadline, the memory sampler beside them, then the drain. The
    sampler ends the run early if the server process dies."""
    samples: list[MemorySample] = []
    metrics_start: list = []
    duration = traffic.deadline - traffic.t0
    died_at: float | None = None

    async def sampler() -> None:
        nonlocal died_at
        interval = min(1.0, max(0.2, duration / 100))
        scraped = False
        while time.monotonic() < traffic.deadline:
            t = time.monotonic() - traffic.t0
            if not alive():
                died_at, traffic.deadline = t, time.monotonic()
                break
            samples.append(sample_memory(pid, t))
            if not scraped and t >= warm_s:
                metrics_start.extend(await _scrape(url))
                scraped = True
            await asyncio.sleep(interval)

    rng = random.Random(seed)
    metrics_before = await _scrape(url)  # the server's 5xx count is taken from here on
    cpu0 = time.process_time()
    server_cpu0 = cpu_seconds(pid) + sum(cpu_seconds(c) for c in children(pid))
    sampling = asyncio.create_task(sampler())
    health = asyncio.create_task(probe_health(traffic))
    drain_limit = traffic.request_timeout_s * 4 + 15
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.gather(
            *(run_tenant(traffic, t, random.Random(rng.randrange(2**32)))
              for t in traffic.tenants),
            run_hostile(traffic, hostile, random.Random(rng.randrange(2**32)))),
            duration + drain_limit)
    except TimeoutError:
        timed_out = True
    drained_at = time.monotonic() - traffic.t0
    await sampling
    healthz = await health
    await asyncio.sleep(1.0)  # an engine process reports its gauges every 0.25 s
    end = sample_memory(pid, time.monotonic() - traffic.t0)
    metrics_end = await _scrape(url)
    clients_cpu = time.process_time() - cpu0
    server_cpu = cpu_seconds(pid) + sum(cpu_seconds(c) for c in children(pid)) - server_cpu0
    start = next((s for s in samples if s.t >= warm_s), samples[0] if samples else end)
    peak: dict[str, int] = {}
    for s in [*samples, end]:
        for name, value in [*s.rss.items(), ("total", sum(s.rss.values()))]:
            peak[name] = max(peak.get(name, 0), value)
    step = max(1, len(samples) // 200)
    before_5xx = server_5xx(metrics_before)
    return {
        "drained_after_s": round(drained_at, 2), "drain_timed_out": timed_out,
        "healthz": healthz,
        "server_died_at_s": died_at,
        "memory": memory_report(start, end, peak, limit_pct=RSS_LIMIT_PCT),
        "rss_timeline_mib": [{"t": round(s.t, 1), **{k: round(v / 2**20, 1)
                                                     for k, v in s.rss.items()}}
                             for s in samples[::step]],
        "device_memory_samples": (device_memory(metrics_start), device_memory(metrics_end)),
        "server_5xx": {k: v - before_5xx.get(k, 0.0) for k, v in server_5xx(metrics_end).items()
                       if v > before_5xx.get(k, 0.0)},
        "after_drain": {"in_flight": _gauge(metrics_end, "softprompt_in_flight_requests"),
                        "queue_depth": _gauge(metrics_end, "softprompt_queue_depth"),
                        "parked": _gauge(metrics_end, "softprompt_parked_requests")},
        "model_device": next((labels.get("device") for n, labels, _ in metrics_end
                              if n == "softprompt_model_info"), None),
        "cpu_seconds": {"server": server_cpu, "clients": clients_cpu,
                        "clients_share_pct": 100 * clients_cpu / max(1e-9,
                                                                     clients_cpu + server_cpu)},
        "processes": {"server": pid, **{f"child {c}": cmdline(c)[:120] for c in children(pid)}},
    }


def run_soak(*, minutes: float, model: str = "builtin:tiny", device: str = "cpu",
             engine_process: bool = False, torch_threads: int = 0, tenants: int = 3,
             max_new_tokens: int = 48,
             seed: int = 0, log_path: Path | None = None,
             server_flags: list[str] | None = None) -> dict[str, Any]:
    """Start the server, soak it for `minutes`, stop it; the report as a dict (see
    docs/benchmarks.md for its fields). `log_path`: where the server's log is kept."""
    from benchmarks.harness.results import environment
    from tests.e2e.server_process import ServerProcess

    duration = minutes * 60
    warm_s = min(60.0, duration / 10)
    windows = max(1, round(duration / 60)) if duration >= 600 else 10
    kept_log = log_path
    with tempfile.TemporaryDirectory(prefix="softprompt-soak-") as tmp:
        root = Path(tmp)
        log_path = log_path or root / "server.log"
        log_path.write_bytes(b"")
        names = _tenants(tenants)
        _keys_file(root / "keys.json", names)
        variants = _adapter_variants(root / "adapters", model)
        flags = ["--api-keys", str(root / "keys.json"), "--device", device, "--dtype", "auto",
                 "--log-level", "warning", "--max-wait-ms", "5",
                 "--torch-threads", str(torch_threads),
                 *(["--engine-process"] if engine_process else []), *(server_flags or [])]
        server = ServerProcess(Path(model), root / "store", log_path, *flags)
        server.start(timeout=600)
        try:
            state = [Tenant(name, key,
                            stable={f"{name}-stable-{i}": VIRTUAL_TOKENS[(2 * i + k) % 6]
                                    for i in range(STABLE)},
                            churn={f"{name}-churn-{i}": True for i in range(CHURNED)})
                     for k, (name, key) in enumerate(names)]
            hostile = Tenant(HOSTILE[0], HOSTILE[1],
                             stable={f"{HOSTILE[0]}-stable-0": VIRTUAL_TOKENS[2]}, churn={})
            _upload_all(server.url, [*state, hostile], variants)
            asyncio.run(_warm_up(server.url, [*state, hostile]))
            t0 = time.monotonic()
            traffic = Traffic(base_url=server.url, model=model, tenants=state,
                              variants=variants, deadline=t0 + duration, t0=t0,
                              max_new_tokens=max_new_tokens)
            proc = server.proc
            measured = asyncio.run(_soak(server.url, proc.pid, traffic, hostile=hostile,
                                         warm_s=warm_s, seed=seed,
                                         alive=lambda: proc.poll() is None))
        finally:
            server.stop()
        exit_status = server.proc.returncode
        log_errors = [line for line in log_path.read_text(errors="replace").splitlines()
                      if "ERROR" in line or "Traceback" in line][:50]
    summary = summarize(traffic.outcomes, duration_s=duration, windows=windows)
    start_dev, end_dev = measured.pop("device_memory_samples")
    on = measured.pop("model_device") or device
    dev: Any = ({k: (start_dev.get(k, 0.0), v) for k, v in end_dev.items()} if end_dev else
                "n/a (cpu)" if on == "cpu" else
                "n/a (the server exports no device-memory gauge in /metrics)")
    passed = (summary["count_5xx"] == 0 and summary["unexpected_count"] == 0
              and not measured["server_5xx"] and not measured["drain_timed_out"]
              and measured["server_died_at_s"] is None and exit_status == 0)
    return {
        "workload": {"name": "soak"}, "environment": environment(),
        "config": {"minutes": minutes, "duration_s": duration, "warm_up_s": warm_s,
                   "model": model, "device": on, "engine_process": engine_process,
                   "torch_threads": torch_threads,
                   "tenants": [n for n, _ in names], "clients": CLIENTS_PER_TENANT * tenants,
                   "max_new_tokens": max_new_tokens, "seed": seed,
                   "virtual_tokens": list(VIRTUAL_TOKENS), "server_flags": flags},
        "summary": summary, **measured, "device_memory": dev,
        "ops_on_busy": {t.name: dict(t.ops_on_busy) for t in state},
        "hostile_tenant": HOSTILE[0],
        "server_exit": exit_status, "server_log": str(kept_log) if kept_log else None,
        "server_log_errors": log_errors, "passed": passed,
    }


if __name__ == "__main__":
    raise SystemExit(main())
