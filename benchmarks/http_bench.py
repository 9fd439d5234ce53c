"""`cpu-ref` through HTTP: the real server (a subprocess) against in-process plain generate.

Run: ``python benchmarks/http_bench.py [--repeats 3] [--overhead-requests 200]``

Same workload as benchmarks/cpu_ref.py (GPT-2-small shape, random, float32 on the CPU; 32
requests each with its own 20-virtual-token prompt-tuning adapter, 32 ids in, 32 out), but the
32 requests come from 32 concurrent HTTP clients to `python -m server serve`, with the adapters
uploaded over HTTP. The baseline is cpu_ref's `plain`: one in-process model.generate over 32
rows of 52 ids, measured in this same run (interleaved, best of --repeats).

HTTP-layer overhead: sequential 1-token requests on a keep-alive connection. The server reports
how long its handler awaited the engine in a `Server-Timing: engine;dur=<ms>` header; overhead
= client-measured latency - that engine time, i.e. everything HTTP adds: the client library,
loopback TCP, uvicorn, routing, pydantic validation, tokenization, JSON, logging and metrics.
Targets: throughput >= 0.85x plain; median overhead < 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpu_ref  # noqa: E402  (benchmarks/ is not a package)

from tests.e2e.server_process import ServerProcess  # noqa: E402

N, NEW = cpu_ref.N_REQUESTS, cpu_ref.NEW


def build_model(out: Path) -> Path:
    """cpu_ref's model, with a whitespace pre-tokenizer so text "<t5> <t9>" is exactly [5, 9]."""
    cpu_ref.build_model(out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save_pretrained(out)
    return out


def upload_all(url: str, adapters: list[Path]) -> None:
    with httpx.Client(base_url=url, timeout=120) as c:
        for i, d in enumerate(adapters):
            r = c.post("/v1/adapters", data={"adapter_id": f"a{i}"}, files={
                "config": ("adapter_config.json", (d / "adapter_config.json").read_bytes()),
                "weights": ("adapter_model.safetensors",
                            (d / "adapter_model.safetensors").read_bytes())})
            r.raise_for_status()


async def http_round(client: httpx.AsyncClient, texts: list[str]) -> float:
    """32 clients, one request each, all at once; seconds until the last answer."""
    async def one(i: int) -> None:
        r = await client.post("/v1/generate", json={
            "adapter_id": f"a{i}", "text": texts[i], "max_new_tokens": NEW, "ignore_eos": True})
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] == NEW

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(N)))
    return time.perf_counter() - start


def overhead(url: str, text: str, requests: int) -> tuple[float, float, float]:
    """Median client latency, engine time and their difference (ms) of 1-token requests."""
    latencies, engine, diffs = [], [], []
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(requests + 10):
            body = {"adapter_id": f"a{i % N}", "text": text, "max_new_tokens": 1}
            start = time.perf_counter()
            r = c.post("/v1/generate", json=body)
            ms = (time.perf_counter() - start) * 1000
            r.raise_for_status()
            engine_ms = float(r.headers["server-timing"].split("dur=")[1])
            if i >= 10:  # warm-up
                latencies.append(ms)
                engine.append(engine_ms)
                diffs.append(ms - engine_ms)
    return statistics.median(latencies), statistics.median(engine), statistics.median(diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overhead-requests", type=int, default=200)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, cpu_ref.VOCAB, (N, cpu_ref.PROMPT), generator=gen).tolist()
    texts = [" ".join(f"<t{t}>" for t in p) for p in prompts]
    tokens = N * NEW
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model")
        assert AutoTokenizer.from_pretrained(model_dir)(texts[0])["input_ids"] == prompts[0]
        adapters = cpu_ref.write_adapters(work / "adapters")
        plain_once = cpu_ref.plain_runner(model_dir, prompts)
        with ServerProcess(model_dir, work / "store", work / "server.log",
                           "--max-batch-size", str(N), "--max-wait-ms", "50",
                           "--log-level", "warning") as server:
            upload_all(server.url, adapters)
            loop = asyncio.new_event_loop()
            client = httpx.AsyncClient(base_url=server.url, timeout=300,
                                       limits=httpx.Limits(max_connections=N))
            runners = {"http": lambda: loop.run_until_complete(http_round(client, texts)),
                       "plain": plain_once}
            for run in runners.values():  # warm-up; also makes the 32 adapters resident
                run()
            runs: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(args.repeats):
                for name, run in runners.items():
                    runs[name].append(run())
            loop.run_until_complete(client.aclose())
            loop.close()
            latency, engine_ms, over = overhead(server.url, texts[0], args.overhead_requests)
    http_s, plain_s = min(runs["http"]), min(runs["plain"])
    print(f"cpu-ref over HTTP: GPT-2-small shape, float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {N} clients x ({cpu_ref.VIRTUAL} virtual + "
          f"{cpu_ref.PROMPT} in, {NEW} out); best of {args.repeats}")
    print(f"  {'what':<28}{'tok/s':>10}{'seconds':>10}   runs")
    for name, label in (("http", "HTTP, 32 concurrent clients"),
                        ("plain", "in-process plain generate")):
        best = min(runs[name])
        shown = ", ".join(f"{t:.2f}" for t in runs[name])
        print(f"  {label:<28}{tokens / best:>10.1f}{best:>10.2f}   {shown}")
    print(f"  HTTP / plain = {plain_s / http_s:.2f}x  (target >= 0.85x)")
    print(f"  1-token requests ({args.overhead_requests}, sequential): median latency "
          f"{latency:.2f} ms, engine {engine_ms:.2f} ms, HTTP-layer overhead {over:.2f} ms "
          f"(target < 5 ms)")


if __name__ == "__main__":
    main()
