"""Fairness: tenant A keeps a deep backlog queued while tenant B sends 5 requests at a time.

Prints B's median latency with A's flood and on an idle engine, and their ratio (target: within
2x), and tenant A's completed requests per second alone and beside B (what fairness costs A).
The idle and loaded phases alternate --cycles times. Runs the real engine in process (the
scheduler is what decides fairness) on builtin:tiny, so it needs no download; `--http` runs
the real server instead (a subprocess, two tenants in an --api-keys file) with the clients in
this process on loopback HTTP, where the server's event loop serving A's flood competes with
its engine thread. `--engine vllm` (with `--http`) serves on the vllm engine, whose fairness is
its admission's weighted fair shares; `--model cpu-ref` serves a harness workload's model
(random weights built from its shape) instead of builtin:tiny, on either engine:

    python benchmarks/fairness.py [--policy round_robin|fifo] [--batching core|static]
                                  [--device cpu|cuda] [--backlog 200] [--rounds 6]
                                  [--cycles 3] [--max-batch-size 32]
                                  [--max-batch-tokens 2048] [--prompt-tokens N] [--http]
                                  [--engine builtin|vllm] [--model builtin:tiny|WORKLOAD]
                                  [--layers N] [--engine-process] [--torch-threads N]
                                  [--contended-tenant-rows N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store.local import LocalAdapterStore  # noqa: E402
from benchmarks.fairness_model import (  # noqa: E402
    ENGINES,
    MODELS,
    PROMPT,
    PROMPT_TOKENS,
    TINY,
    ServedModel,
    check_vllm,
    fairness_workload,
    long_prompt,
    served_model,
)
from benchmarks.harness.results import environment, write_json  # noqa: E402
from benchmarks.harness.server_log import log_on_failure  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.fairness import FifoPolicy  # noqa: E402
from server.engine.interface import GenerationRequest, SamplingParams  # noqa: E402

# round_robin: the engine's default policy, built as the server builds it (with the
# contended cap of --contended-tenant-rows).
POLICIES = {"round_robin": None, "fifo": FifoPolicy}


def _request(engine, tenant: str, new_tokens: int, text: str,
             prompt_tokens: int | None = None) -> GenerationRequest:
    """Tokenized per request, as a server does. `prompt_tokens`: the ids cut to that many
    (longer contexts make the cost of moving KV caches show)."""
    ids = engine.tokenize(text)
    if prompt_tokens is not None:
        ids = ids[:prompt_tokens]
    return GenerationRequest(request_id=uuid.uuid4().hex, adapter_id=None, namespace=tenant,
                             prompt_ids=tuple(ids),
                             params=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))


Send = Callable[[str], Awaitable[object]]  # one request of this tenant, to its answer


def start_engine(settings: Settings, policy: str) -> Engine:
    """The real engine in process with the scheduling policy `policy`, loaded."""
    make_policy = POLICIES[policy]
    engine = Engine(settings, LocalAdapterStore(settings.store),
                    policy=make_policy() if make_policy is not None else None)
    engine.start()
    engine.wait_until_ready(100)  # within run_checks.sh's limits for these steps
    return engine


def engine_sender(engine, new_tokens: int, prompt_tokens: int | None = None, *,
                  text: str | None = None) -> Send:
    """Requests to the engine in process; `text` None: builtin:tiny's tweet prompt."""
    if text is None:
        text = PROMPT if prompt_tokens is None else long_prompt(prompt_tokens)

    def send(tenant: str) -> Awaitable[object]:
        return engine.generate(_request(engine, tenant, new_tokens, text, prompt_tokens))
    return send


async def _b_round(send: Send) -> list[float]:
    """Five concurrent requests of tenant B; each one's latency in seconds."""
    async def one() -> float:
        started = time.perf_counter()
        await send("tenant-b")
        return time.perf_counter() - started
    return list(await asyncio.gather(*(one() for _ in range(5))))


async def measure(send: Send, *, backlog: int, rounds: int,
                  a_alone_s: float = 0.0) -> tuple[list[float], float, float]:
    """B's latencies over `rounds` rounds while `backlog` of A's requests stay queued; A's
    completed requests per second alone (the first `a_alone_s` seconds, before B starts) and
    alongside B. A's rate is what shows that B's latency is not bought by starving A."""
    stop = asyncio.Event()
    done = 0

    async def flood_worker() -> None:  # each worker keeps one of A's requests queued
        nonlocal done
        while not stop.is_set():
            await send("tenant-a")
            done += 1

    workers = [asyncio.create_task(flood_worker()) for _ in range(backlog)]
    alone = 0.0
    if backlog:
        # A's backlog builds up and its batch fills, and B's idle phase leaves the engine's
        # window of tenants that count as active (1 s): "alone" means the cap is off.
        await asyncio.sleep(1.5)
        if a_alone_s:
            before, started = done, time.perf_counter()
            await asyncio.sleep(a_alone_s)
            alone = (done - before) / (time.perf_counter() - started)
    before, started = done, time.perf_counter()
    latencies: list[float] = []
    for _ in range(rounds):
        latencies += await _b_round(send)
    beside = (done - before) / (time.perf_counter() - started) if backlog else 0.0
    stop.set()
    await asyncio.gather(*workers)
    return latencies, alone, beside


async def run_fairness(*, policy: str = "round_robin", backlog: int = 200, rounds: int = 6,
                       cycles: int = 3, new_tokens: int = 8, max_batch_size: int = 32,
                       max_batch_tokens: int = 2048, batching: str = "core",
                       device: str = "cpu", prompt_tokens: int | None = None,
                       http: bool = False, engine_process: bool = False,
                       torch_threads: int = 0, contended_tenant_rows: int = 0,
                       engine: str = "builtin", model: str = TINY,
                       layers: int | None = None) -> dict[str, Any]:
    """B's latencies idle and under A's flood on one engine; the harness reports this dict.

    The idle and loaded phases alternate `cycles` times (`rounds` B rounds each) and the
    medians pool every cycle, so a slow stretch of a shared machine lands in both phases
    rather than in one. `http`: through the real server (a subprocess, two tenants in an
    --api-keys file) and loopback HTTP, the clients in this process; `engine_process`: that
    server with --engine-process. `torch_threads`: the engine's --torch-threads (0: torch's
    default); `contended_tenant_rows`: its --contended-tenant-rows (0: no cap). `engine`: the
    server's --engine (vllm: with `http` only). `model`: builtin:tiny or a harness workload's
    name, whose model shape is built with random weights; `layers`: that shape with this many
    layers.
    """
    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r}: one of {', '.join(ENGINES)}")
    if engine_process and not http:
        raise ValueError("--engine-process is a server option: use it with --http")
    if http and policy != "round_robin":
        raise ValueError("over HTTP the server runs its default policy: round robin")
    if model not in MODELS:
        raise ValueError(f"--model {model!r}: one of {', '.join(MODELS)}")
    if layers is not None and model == TINY:
        raise ValueError("--layers shrinks a workload's model: use it with --model WORKLOAD")
    w = None if model == TINY else fairness_workload(
        model, device=device, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        max_batch_size=max_batch_size, layers=layers)
    if engine == "vllm":
        check_vllm(w, http=http, engine_process=engine_process, batching=batching,
                   contended_tenant_rows=contended_tenant_rows)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        served = served_model(w, root, engine=engine, prompt_tokens=prompt_tokens)
        if http:
            flags = ["--engine", engine, "--max-batch-size", str(max_batch_size),
                     "--max-batch-tokens", str(max_batch_tokens),
                     "--torch-threads", str(torch_threads)]
            if served.max_model_len:
                flags += ["--max-model-len", str(served.max_model_len)]
            flags += ["--contended-tenant-rows", str(contended_tenant_rows)]
            if engine == "vllm":
                flags += ["--kv-cache-memory", served.kv_cache_memory]
            else:
                flags += ["--max-wait-ms", "5", "--batching", batching,
                          *(["--engine-process"] if engine_process else [])]
            phases = await _http_phases(root, served, backlog=backlog, rounds=rounds,
                                        cycles=cycles, new_tokens=new_tokens, device=device,
                                        flags=flags)
        else:
            settings = Settings(model=served.path, store=str(root / "adapters"),
                                device=device, dtype="auto",  # f32 CPU, bf16 CUDA
                                max_batch_size=max_batch_size,
                                max_batch_tokens=max_batch_tokens, max_wait_ms=5,
                                max_model_len=served.max_model_len,
                                torch_threads=torch_threads,
                                contended_tenant_rows=contended_tenant_rows,
                                batching=batching)
            running = start_engine(settings, policy)
            try:
                phases = await _phases(
                    engine_sender(running, new_tokens, prompt_tokens, text=served.text),
                    backlog=backlog, rounds=rounds, cycles=cycles)
            finally:
                await running.aclose(30)
    idle, loaded, a_alone, a_beside = phases
    idle_ms, loaded_ms = statistics.median(idle) * 1000, statistics.median(loaded) * 1000
    return {"engine": engine, "model": served.line,
            "policy": policy, "batching": batching, "device": device, "http": http,
            "engine_process": engine_process, "torch_threads": torch_threads,
            "contended_tenant_rows": contended_tenant_rows,
            "backlog_a": backlog,
            "b_concurrent": 5,
            "rounds": rounds, "cycles": cycles,
            "max_batch_size": max_batch_size, "max_batch_tokens": max_batch_tokens,
            "max_model_len": served.max_model_len or None,
            "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
            "b_idle_ms": {"p50": idle_ms, "max": max(idle) * 1000},
            "b_loaded_ms": {"p50": loaded_ms, "max": max(loaded) * 1000},
            "a_requests_per_s": {"alone": statistics.mean(a_alone),
                                 "beside_b": statistics.mean(a_beside)},
            "ratio": loaded_ms / idle_ms, "target": "<= 2x"}


async def _phases(send: Send, *, backlog: int, rounds: int,
                  cycles: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """B's latencies idle and loaded, and A's requests/s alone and beside B, per cycle."""
    idle: list[float] = []
    loaded: list[float] = []
    a_alone: list[float] = []
    a_beside: list[float] = []
    await measure(send, backlog=0, rounds=1)  # warm-up
    for _ in range(cycles):
        idle += (await measure(send, backlog=0, rounds=rounds))[0]
        b, alone, beside = await measure(send, backlog=backlog, rounds=rounds, a_alone_s=1.0)
        loaded += b
        a_alone.append(alone)
        a_beside.append(beside)
    return idle, loaded, a_alone, a_beside


class _HttpClient:
    """Keep-alive HTTP/1.1 connections to the server, one request at a time each, per tenant.

    Far lighter than httpx (which took more CPU than the server did here): on a small
    machine the clients share the cores the server is measured on, so they must cost little.
    The server answers a non-streaming generate with a Content-Length body."""

    def __init__(self, port: int, keys: dict[str, str], body: dict) -> None:
        self._port = port
        payload = json.dumps(body).encode()
        self._requests = {
            tenant: (f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
            for tenant, key in keys.items()}
        self._idle: dict[str, list] = {tenant: [] for tenant in keys}

    async def send(self, tenant: str) -> bytes:
        idle = self._idle[tenant]
        reader, writer = idle.pop() if idle else await asyncio.open_connection(
            "127.0.0.1", self._port)
        try:
            writer.write(self._requests[tenant])
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split(" ", 2)[1])
            length = next(int(line.split(":", 1)[1]) for line in head
                          if line.lower().startswith("content-length:"))
            answer = await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        idle.append((reader, writer))
        if status != 200:
            raise RuntimeError(f"{tenant}: HTTP {status}: {answer[:300]!r}")
        return answer

    def close(self) -> None:
        for idle in self._idle.values():
            for _, writer in idle:
                writer.close()


async def _http_phases(root: Path, served: ServedModel, *, backlog: int, rounds: int,
                       cycles: int, new_tokens: int, device: str,
                       flags: list[str]) -> tuple[list[float], ...]:
    """The phases against the real server; every answer must be a 200."""
    from tests.e2e.server_process import ServerProcess

    keys = {"tenant-a": "fairness-a-key", "tenant-b": "fairness-b-key"}
    (root / "keys.json").write_text(json.dumps(
        {"tenants": [{"name": name, "keys": [key]} for name, key in keys.items()]}))
    server = ServerProcess(Path(served.path), root / "adapters", root / "server.log",
                           "--api-keys", str(root / "keys.json"), "--device", device,
                           "--dtype", "auto", "--log-level", "warning", *flags)
    # The builtin engine within run_checks.sh's limits for these steps; vLLM compiles its
    # model first (ServerProcess's own bound for it).
    server.start(timeout=100 if "vllm" not in flags else None)
    client = _HttpClient(server.port, keys, {"text": served.text,
                                             "max_new_tokens": new_tokens,
                                             "ignore_eos": True})
    try:
        with log_on_failure(server, "fairness over HTTP"):
            return await _phases(client.send, backlog=backlog, rounds=rounds, cycles=cycles)
    finally:
        client.close()
        server.stop()


def fairness_report(r: dict[str, Any]) -> dict[str, Any]:
    """The JSON a run leaves: its figures and the environment they were measured in."""
    return {"workload": {"name": "fairness"}, "environment": environment(), "result": r}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", choices=sorted(POLICIES), default="round_robin")
    parser.add_argument("--backlog", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help=f"prompt length (default: the {PROMPT_TOKENS}-token tweet prompt; "
                             f"with a workload's model, {PROMPT_TOKENS} random tokens)")
    parser.add_argument("--batching", choices=("core", "static"), default="core")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--http", action="store_true",
                        help="through the real server over loopback HTTP (clients in this "
                             "process)")
    parser.add_argument("--engine", choices=ENGINES, default="builtin",
                        help="the server's --engine (default builtin); vllm: with --http, "
                             "vLLM installed")
    parser.add_argument("--model", choices=MODELS, default=TINY,
                        help=f"{TINY} (the default), or a harness workload's model (python "
                             "-m benchmarks list), built from its shape with random weights, "
                             "on either engine")
    parser.add_argument("--layers", type=int, default=None,
                        help="a workload's model with this many layers (to try the path on "
                             "a small machine)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="the engine's --torch-threads (default 0: torch's default)")
    parser.add_argument("--contended-tenant-rows", type=int, default=0,
                        help="the engine's --contended-tenant-rows (default 0: no cap)")
    parser.add_argument("--engine-process", action="store_true",
                        help="with --http: the server runs its engine in a child process "
                             "(--engine-process)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the figures and the environment here as JSON")
    args = parser.parse_args(argv)
    r = asyncio.run(run_fairness(
        policy=args.policy, backlog=args.backlog, rounds=args.rounds, cycles=args.cycles,
        new_tokens=args.new_tokens, max_batch_size=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens, batching=args.batching, device=args.device,
        prompt_tokens=args.prompt_tokens, http=args.http, engine_process=args.engine_process,
        torch_threads=args.torch_threads, contended_tenant_rows=args.contended_tenant_rows,
        engine=args.engine, model=args.model, layers=args.layers))
    print(f"engine {r['engine']}, model {r['model']}")
    scheduling = ("admission: weighted fair shares" if args.engine == "vllm" else
                  f"policy={args.policy} batching={args.batching}") + \
        f" contended_tenant_rows={args.contended_tenant_rows or 'off'}"
    print(f"{'HTTP, ' if args.http else ''}"
          f"{'engine process, ' if args.engine_process else ''}"
          f"{f'{args.torch_threads} torch thread(s), ' if args.torch_threads else ''}"
          f"{scheduling}, backlog(A)={args.backlog} "
          f"B=5 concurrent x {args.rounds} rounds x {args.cycles} cycles, "
          f"max_batch_size={args.max_batch_size}, "
          f"{args.new_tokens} new tokens, prompt {args.prompt_tokens or PROMPT_TOKENS} tokens")
    print(f"B median latency idle:         {r['b_idle_ms']['p50']:8.1f} ms")
    print(f"B median latency with A flood: {r['b_loaded_ms']['p50']:8.1f} ms")
    a = r["a_requests_per_s"]
    print(f"A's requests/s alone {a['alone']:.0f}, beside B {a['beside_b']:.0f}")
    print(f"ratio: {r['ratio']:.2f}x (target <= 2x) -> {'OK' if r['ratio'] <= 2 else 'OVER'}")
    if args.json is not None:
        write_json(fairness_report(r), args.json)
        print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
