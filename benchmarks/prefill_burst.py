"""Prefill burst: how long running streams stall when a burst of long prompts arrives.

Tenant B streams a long generation; tenant A then sends a burst of long prompts at once. Prints,
for each --max-batch-tokens budget given (the engine core in process on builtin:tiny):
- the longest engine step while A's requests join: the time between two decode steps, which
  every running stream waits (B takes a token at every step);
- the longest gap between B's stream chunks as the client sees them, which also holds the
  detokenizer keeping back bytes of an incomplete character (the tiny model emits random
  bytes) and the event loop's own delays.

    python -m benchmarks.prefill_burst [--device cpu|cuda] [--burst 32] [--prompt-tokens 1000]
                                       [--budgets 4096,1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store.local import LocalAdapterStore  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.interface import GenerationRequest, SamplingParams  # noqa: E402
from server.engine.observer import NullObserver  # noqa: E402


class StepClock(NullObserver):
    """When each engine step started (the engine thread calls batch_started once per step)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def batch_started(self, *, size: int, distinct_adapters: int) -> None:
        self.starts.append(time.perf_counter())


def _request(tenant: str, prompt: list[int], new_tokens: int) -> GenerationRequest:
    return GenerationRequest(request_id=uuid.uuid4().hex, adapter_id=None, namespace=tenant,
                             prompt_ids=tuple(prompt),
                             params=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))


async def measure(*, budget: int, burst: int, prompt_tokens: int, device: str) -> dict:
    """B's token gaps (ms) before and during A's burst, and how long the burst took."""
    with tempfile.TemporaryDirectory() as store:
        # The contended cap stays off (its default): this measures what the budget alone does.
        settings = Settings(store=store, device=device, dtype="auto", max_batch_size=64,
                            max_wait_ms=5, max_batch_tokens=budget, batching="core",
                            max_input_tokens=max(8192, prompt_tokens))
        clock = StepClock()
        engine = Engine(settings, LocalAdapterStore(store), observer=clock)
        engine.start()
        engine.wait_until_ready(300)
        try:
            long_prompt = (engine.tokenize("a" * prompt_tokens) * 2)[:prompt_tokens]
            await engine.generate(_request("tenant-a", long_prompt, 2))  # warm-up
            stream = await engine.open_stream(_request("tenant-b", [1, 2, 3], 2040))
            arrivals: list[float] = []
            burst_at: list[float] = []

            async def read() -> None:
                async for _ in stream:
                    arrivals.append(time.perf_counter())
                    if burst_at and len(arrivals) > 50 and arrivals[-1] > burst_done[0]:
                        break

            burst_done = [float("inf")]
            reader = asyncio.ensure_future(read())
            while len(arrivals) < 50:
                await asyncio.sleep(0.01)
            burst_at.append(time.perf_counter())
            await asyncio.gather(*(engine.generate(_request("tenant-a", long_prompt, 4))
                                   for _ in range(burst)))
            burst_done[0] = time.perf_counter()
            await reader
            await stream.aclose()
        finally:
            await engine.aclose(30)
    gaps = [(b - a) * 1000 for a, b in zip(arrivals, arrivals[1:], strict=False)]
    before = [g for g, t in zip(gaps, arrivals[1:], strict=False) if t < burst_at[0]]
    during = [g for g, t in zip(gaps, arrivals[1:], strict=False)
              if burst_at[0] <= t <= burst_done[0]]
    steps = [(b - a) * 1000 for a, b in zip(clock.starts, clock.starts[1:], strict=False)
             if burst_at[0] <= b <= burst_done[0]]
    return {"budget": budget, "burst": burst, "prompt_tokens": prompt_tokens,
            "step_during_max_ms": max(steps, default=0.0),
            "gap_before_ms": statistics.median(before),
            "gap_during_max_ms": max(during, default=0.0),
            "gap_during_p99_ms": _p99(during),
            "burst_s": burst_done[0] - burst_at[0]}


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--burst", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--budgets", default="4096,1000000")
    args = parser.parse_args()
    print(f"builtin:tiny on {args.device}: B streams; A sends {args.burst} prompts of "
          f"{args.prompt_tokens} tokens at once")
    for budget in (int(b) for b in args.budgets.split(",")):
        r = await measure(budget=budget, burst=args.burst, prompt_tokens=args.prompt_tokens,
                          device=args.device)
        print(f"--max-batch-tokens {budget:>8}: during A's burst the longest step took "
              f"{r['step_during_max_ms']:.1f} ms; B's chunks {r['gap_before_ms']:.1f} ms apart "
              f"before, at most {r['gap_during_max_ms']:.1f} ms during; burst served in "
              f"{r['burst_s']:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
