"""Tenant B's latency over time while tenant A floods the engine, per scheduling policy.

B sends 5 requests at a time, round after round, for the whole run; A keeps --backlog requests
queued from --flood-start to --flood-end seconds. Each of B's requests is plotted at the time
it was answered, with its latency, for the engine's default (weighted fair shares) and for
first-come-first-served. The real engine in process on builtin:tiny (no download).

    python -m benchmarks.plots.fairness_timeline [--device cuda]

Writes docs/img/fairness-timeline.png and benchmarks/results/fairness-timeline.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.fairness import engine_sender, start_engine
from benchmarks.plots.figure import REPO, axes, commit
from server.config import Settings


async def _timeline(send, *, seconds: float, flood: tuple[float, float],
                    backlog: int) -> list[tuple[float, float]]:
    """(answered at, latency) of each of B's requests, in seconds from the start."""
    t0 = time.perf_counter()
    flooding = asyncio.Event()
    stop = asyncio.Event()

    async def flood_worker() -> None:
        await flooding.wait()
        while not stop.is_set():
            await send("tenant-a")

    async def b_one() -> tuple[float, float]:
        started = time.perf_counter()
        await send("tenant-b")
        done = time.perf_counter()
        return done - t0, done - started

    workers = [asyncio.create_task(flood_worker()) for _ in range(backlog)]
    points: list[tuple[float, float]] = []
    while (now := time.perf_counter() - t0) < seconds:
        if flood[0] <= now < flood[1]:
            flooding.set()
        elif now >= flood[1]:
            stop.set()
        points += await asyncio.gather(*(b_one() for _ in range(5)))
    stop.set()
    flooding.set()
    await asyncio.gather(*workers)
    return points


async def _run(policy: str, args: argparse.Namespace) -> list[tuple[float, float]]:
    with tempfile.TemporaryDirectory() as store:
        settings = Settings(store=store, device=args.device, dtype="auto",
                            max_batch_size=args.max_batch_size, max_wait_ms=5)
        engine = start_engine(settings, policy)
        try:
            send = engine_sender(engine, args.new_tokens)
            await send("tenant-b")  # warm-up
            return await _timeline(send, seconds=args.seconds,
                                   flood=(args.flood_start, args.flood_end),
                                   backlog=args.backlog)
        finally:
            await engine.aclose(30)


def _plot(series: dict[str, list[tuple[float, float]]], args: argparse.Namespace, out: Path,
          title: str) -> None:
    from matplotlib.ticker import FuncFormatter

    labels = {"round_robin": "weighted fair shares (default)", "fifo": "first come, first served"}
    with axes(out, title) as ax:
        for policy, points in series.items():
            ax.scatter([t for t, _ in points], [1000 * lat for _, lat in points], s=6,
                       label=labels.get(policy, policy))
        ax.axvspan(args.flood_start, args.flood_end, color="orange", alpha=0.12,
                   label=f"tenant A keeps {args.backlog} requests queued")
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("tenant B's request latency (ms)")
        ax.legend(fontsize=8, loc="upper left")


def _median_ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):.1f} ms" if values else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--flood-start", type=float, default=4.0)
    parser.add_argument("--flood-end", type=float, default=11.0)
    parser.add_argument("--backlog", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--policies", default="round_robin,fifo")
    parser.add_argument("--png", type=Path, default=REPO / "docs/img/fairness-timeline.png")
    parser.add_argument("--json", type=Path,
                        default=REPO / "benchmarks/results/fairness-timeline.json")
    args = parser.parse_args(argv)
    series = {}
    for policy in args.policies.split(","):
        series[policy] = asyncio.run(_run(policy, args))
        before = [lat for t, lat in series[policy] if t < args.flood_start]
        during = [lat for t, lat in series[policy] if args.flood_start + 1 <= t < args.flood_end]
        print(f"{policy}: B's median latency {_median_ms(before)} before the flood, "
              f"{_median_ms(during)} during it (from its second second)", flush=True)
    measured_at = commit()
    title = (f"builtin:tiny on {args.device}, B sends 5 at a time, {args.new_tokens} new tokens,"
             f" batch {args.max_batch_size}\ncommit {measured_at}")
    _plot(series, args, args.png, title)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"commit": measured_at, "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "b_latency_s": {p: [[round(t, 4), round(lat, 5)] for t, lat in pts]
                        for p, pts in series.items()}}, indent=1) + "\n")
    print(f"wrote {args.png} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
