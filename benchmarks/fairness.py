"""Fairness: tenant A keeps a deep backlog queued while tenant B sends 5 requests at a time.

Prints B's median latency with A's flood and on an idle engine, and their ratio (target: within
2x), and tenant A's completed requests per second alone and beside B (what fairness costs A).
The idle and loaded phases alternate --cycles times. Runs the real engine in process (the
scheduler is what decides fairness; HTTP adds the same constant to both) on builtin:tiny, so
it needs no download:

    python benchmarks/fairness.py [--policy round_robin|fifo] [--batching continuous|static]
                                  [--device cpu|cuda] [--backlog 200] [--rounds 6]
                                  [--cycles 3] [--max-batch-size 32]
                                  [--max-prefill-tokens 4096] [--prompt-tokens N]
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
from server.engine.fairness import (
    FifoPolicy,  # noqa: E402
    RoundRobinPolicy,  # noqa: E402
)
from server.engine.interface import GenerationRequest, SamplingParams  # noqa: E402

POLICIES = {"round_robin": RoundRobinPolicy, "fifo": FifoPolicy}


PROMPT = "Tweet: I love it. Label:"


def _request(engine, tenant: str, new_tokens: int,
             prompt_tokens: int | None = None) -> GenerationRequest:
    """Tokenized per request, as a server does. `prompt_tokens`: the prompt's text repeated
    and cut to that many tokens (longer contexts make the cost of moving KV caches show)."""
    if prompt_tokens is None:
        ids = engine.tokenize(PROMPT)
    else:  # ~1 token per byte with builtin:tiny's byte tokenizer
        ids = engine.tokenize(" ".join([PROMPT] * (prompt_tokens // len(PROMPT) + 1)))
        ids = ids[:prompt_tokens]
    return GenerationRequest(request_id=uuid.uuid4().hex, adapter_id=None, namespace=tenant,
                             prompt_ids=tuple(ids),
                             params=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))


async def _b_round(engine, new_tokens: int, prompt_tokens: int | None) -> list[float]:
    """Five concurrent requests of tenant B; each one's latency in seconds."""
    async def one() -> float:
        started = time.perf_counter()
        await engine.generate(_request(engine, "tenant-b", new_tokens, prompt_tokens))
        return time.perf_counter() - started
    return list(await asyncio.gather(*(one() for _ in range(5))))


async def measure(engine, *, backlog: int, rounds: int, new_tokens: int,
                  a_alone_s: float = 0.0,
                  prompt_tokens: int | None = None) -> tuple[list[float], float, float]:
    """B's latencies over `rounds` rounds while `backlog` of A's requests stay queued; A's
    completed requests per second alone (the first `a_alone_s` seconds, before B starts) and
    alongside B. A's rate is what shows that B's latency is not bought by starving A."""
    stop = asyncio.Event()
    done = 0

    async def flood_worker() -> None:  # each worker keeps one of A's requests queued
        nonlocal done
        while not stop.is_set():
            await engine.generate(_request(engine, "tenant-a", new_tokens, prompt_tokens))
            done += 1

    workers = [asyncio.create_task(flood_worker()) for _ in range(backlog)]
    alone = 0.0
    if backlog:
        await asyncio.sleep(0.5)  # A's backlog builds up and its batch fills
        if a_alone_s:
            before, started = done, time.perf_counter()
            await asyncio.sleep(a_alone_s)
            alone = (done - before) / (time.perf_counter() - started)
    before, started = done, time.perf_counter()
    latencies: list[float] = []
    for _ in range(rounds):
        latencies += await _b_round(engine, new_tokens, prompt_tokens)
    beside = (done - before) / (time.perf_counter() - started) if backlog else 0.0
    stop.set()
    await asyncio.gather(*workers)
    return latencies, alone, beside


async def run_fairness(*, policy: str = "round_robin", backlog: int = 200, rounds: int = 6,
                       cycles: int = 3, new_tokens: int = 8, max_batch_size: int = 32,
                       max_prefill_tokens: int = 4096, batching: str = "continuous",
                       device: str = "cpu", prompt_tokens: int | None = None) -> dict:
    """B's latencies idle and under A's flood on one engine; the harness reports this dict.

    The idle and loaded phases alternate `cycles` times (`rounds` B rounds each) and the
    medians pool every cycle, so a slow stretch of a shared machine lands in both phases
    rather than in one.
    """
    idle: list[float] = []
    loaded: list[float] = []
    a_alone: list[float] = []
    a_beside: list[float] = []
    with tempfile.TemporaryDirectory() as store:
        settings = Settings(store=store, device=device, dtype="auto",  # f32 on CPU, bf16 CUDA
                            max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens,
                            max_wait_ms=5, batching=batching)
        engine = Engine(settings, LocalAdapterStore(store), policy=POLICIES[policy]())
        engine.start()
        engine.wait_until_ready(300)
        try:
            await measure(engine, backlog=0, rounds=1, new_tokens=new_tokens,  # warm-up
                          prompt_tokens=prompt_tokens)
            for _ in range(cycles):
                idle += (await measure(engine, backlog=0, rounds=rounds, new_tokens=new_tokens,
                                       prompt_tokens=prompt_tokens))[0]
                b, alone, beside = await measure(engine, backlog=backlog, rounds=rounds,
                                                 new_tokens=new_tokens, a_alone_s=1.0,
                                                 prompt_tokens=prompt_tokens)
                loaded += b
                a_alone.append(alone)
                a_beside.append(beside)
        finally:
            await engine.aclose(30)
    idle_ms, loaded_ms = statistics.median(idle) * 1000, statistics.median(loaded) * 1000
    return {"policy": policy, "batching": batching, "device": device, "backlog_a": backlog,
            "b_concurrent": 5,
            "rounds": rounds, "cycles": cycles,
            "max_batch_size": max_batch_size, "max_prefill_tokens": max_prefill_tokens,
            "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
            "b_idle_ms": {"p50": idle_ms, "max": max(idle) * 1000},
            "b_loaded_ms": {"p50": loaded_ms, "max": max(loaded) * 1000},
            "a_requests_per_s": {"alone": statistics.mean(a_alone),
                                 "beside_b": statistics.mean(a_beside)},
            "ratio": loaded_ms / idle_ms, "target": "<= 2x"}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", choices=sorted(POLICIES), default="round_robin")
    parser.add_argument("--backlog", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-prefill-tokens", type=int, default=4096)
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="prompt length (default: the 25-token tweet prompt)")
    parser.add_argument("--batching", choices=("continuous", "static"), default="continuous")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    r = await run_fairness(policy=args.policy, backlog=args.backlog, rounds=args.rounds,
                           cycles=args.cycles, new_tokens=args.new_tokens,
                           max_batch_size=args.max_batch_size,
                           max_prefill_tokens=args.max_prefill_tokens,
                           batching=args.batching, device=args.device,
                           prompt_tokens=args.prompt_tokens)
    print(f"policy={args.policy} batching={args.batching} backlog(A)={args.backlog} "
          f"B=5 concurrent x {args.rounds} rounds x {args.cycles} cycles, "
          f"max_batch_size={args.max_batch_size}, "
          f"{args.new_tokens} new tokens, prompt {args.prompt_tokens or 25} tokens")
    print(f"B median latency idle:         {r['b_idle_ms']['p50']:8.1f} ms")
    print(f"B median latency with A flood: {r['b_loaded_ms']['p50']:8.1f} ms")
    a = r["a_requests_per_s"]
    print(f"A's requests/s alone {a['alone']:.0f}, beside B {a['beside_b']:.0f}")
    print(f"ratio: {r['ratio']:.2f}x (target <= 2x) -> {'OK' if r['ratio'] <= 2 else 'OVER'}")


if __name__ == "__main__":
    asyncio.run(main())
