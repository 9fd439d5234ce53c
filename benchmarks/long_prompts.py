"""long-prompts: soft prompts of 256 virtual tokens and texts of 3 to 16 tokens, through HTTP.

Every request of an adapter begins with the same virtual tokens, so the server keeps their keys
and values once per adapter version (the prefix cache) and prefills only the text. This prints,
for the real server (a subprocess on loopback) with the prefix cache on and with
--no-prefix-cache:

- warm TTFT: requests one at a time (streamed), each adapter's prefix already computed, against
  the bare model with the same texts (target on the CPU: within 1.3x);
- cold TTFT: each adapter's first request after the server starts (its load from the store and
  its whole prefill);
- throughput: 256 requests at once spread over 8 adapters, 16 new tokens each.

    python benchmarks/long_prompts.py [--device cpu|cuda] [--dtype float32|bfloat16]
                                      [--virtual-tokens 256] [--adapters 8] [--requests 256]
                                      [--samples 24] [--new-tokens 16] [--json PATH]
                                      [--template TEMPLATE] [--modes prefix-cache,...]
                                      [--engine builtin|vllm]

`--engine vllm` runs the same requests on the vLLM engine (vLLM installed; its prefix cache is
vLLM's own) and adds the mean time the server took to build a request's prompt embeddings
(`softprompt_prompt_build_seconds`).

`--template` uploads the adapters with a P-tuning template instead of as prefixes (the same
rows, spliced around the text with anchors), to compare what templated adapters cost.
GPT-2-small shape (random weights built from config, nothing is downloaded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store import LocalAdapterStore, ModelSpec, TaskType, parse_files  # noqa: E402
from benchmarks.harness.fixtures import (  # noqa: E402
    NAMESPACE,
    adapter_config,
    adapter_embeddings,
    build_model,
)
from benchmarks.harness.server_log import log_on_failure  # noqa: E402
from benchmarks.harness.workloads import GPT2_SMALL, Workload  # noqa: E402
from tests.e2e.server_process import ServerProcess, metric  # noqa: E402

WORKLOAD = Workload(
    "long-prompts", "GPT-2-small shape: adapters of 256 virtual tokens, texts of 3 to 16 tokens",
    GPT2_SMALL, "float32", "cpu", requests=256, adapters=8, virtual_tokens=256,
    prompt_tokens=16, new_tokens=16, baselines=())


MODES = {"prefix-cache": [], "no-prefix-cache": ["--no-prefix-cache"]}
ENGINES = {"builtin": [], "vllm": ["--engine", "vllm"]}


def populate(workload: Workload, store_dir: Path, template: str | None) -> None:
    """The adapters, parsed and stored as an upload does (with the template, if any)."""
    from safetensors.torch import save

    store = LocalAdapterStore(store_dir)
    spec = ModelSpec(token_dim=workload.shape.hidden, task_type=TaskType.CAUSAL_LM)
    config = json.dumps(adapter_config(workload)).encode()
    for i in range(workload.adapters):
        parsed = parse_files(config=config,
                             weights=save({"prompt_embeddings": adapter_embeddings(workload, i)}),
                             weights_name="adapter_model.safetensors", spec=spec)
        store.put(NAMESPACE, f"a{i}", replace(parsed, template=template), overwrite=True)


def texts(count: int, seed: int, vocab: int) -> list[str]:
    """`count` texts of 3 to 16 token ids each, written so the benchmark tokenizer gives
    exactly those ids."""
    rng = random.Random(seed)
    return [" ".join(f"<t{rng.randrange(vocab - 1)}>" for _ in range(rng.randint(3, 16)))
            for _ in range(count)]


async def ttft(client: httpx.AsyncClient, adapter: str | None, text: str,
               new_tokens: int = 1) -> float:
    """Seconds from sending the request to its first streamed event."""
    body = {"adapter_id": adapter, "text": text, "max_new_tokens": new_tokens,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/generate", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and first is None:
                first = time.perf_counter() - start
    assert first is not None
    return first


async def throughput(client: httpx.AsyncClient, adapters: int, prompts: list[str],
                     new_tokens: int) -> dict:
    async def one(i: int) -> int:
        body = {"adapter_id": f"a{i % adapters}", "text": prompts[i], "max_new_tokens": new_tokens,
                "ignore_eos": True}
        r = await client.post("/v1/generate", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(len(prompts)))))
    wall = time.perf_counter() - start
    return {"requests": len(prompts), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1)}


def prefix_counters(scrape: str) -> dict[str, float]:
    out = {}
    for line in scrape.splitlines():
        if line.startswith("softprompt_prefix_cache_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("softprompt_")] = float(value)
        elif line.startswith("vllm:prefix_cache_"):  # the vLLM engine's own, summed
            name, value = line.rsplit(" ", 1)
            key = name.split("{")[0].replace(":", "_")
            out[key] = out.get(key, 0.0) + float(value)
    return out


async def measure(url: str, args: argparse.Namespace, vocab: int) -> dict:
    limits = httpx.Limits(max_connections=args.requests + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await ttft(client, None, "<t1> <t2> <t3>")  # allocations
        cold = [await ttft(client, f"a{i}", text)
                for i, text in enumerate(texts(args.adapters, 1, vocab))]
        samples = texts(args.samples, 2, vocab)
        warm = [await ttft(client, f"a{i % args.adapters}", text)
                for i, text in enumerate(samples)]
        bare = [await ttft(client, None, text) for text in samples]
        # The bare model behind a fixed text as long as the soft prompt, cached after its
        # first request where the engine caches text (vLLM): what a prefix hit of that
        # length costs without any adapter.
        prefix = " ".join(f"<t{i % (vocab - 1)}>" for i in range(args.virtual_tokens))
        await ttft(client, None, f"{prefix} {samples[0]}")
        bare_prefix = [await ttft(client, None, f"{prefix} {text}") for text in samples]
        run = await throughput(client, args.adapters, texts(args.requests, 3, vocab),
                               args.new_tokens)
    with httpx.Client(base_url=url) as sync:
        scrape = sync.get("/metrics").text
    med = statistics.median
    return {"ttft_ms": {"cold_p50": round(1000 * med(cold), 2),
                        "warm_p50": round(1000 * med(warm), 2),
                        "bare_p50": round(1000 * med(bare), 2),
                        "warm_over_bare": round(med(warm) / med(bare), 3),
                        "bare_prefix_p50": round(1000 * med(bare_prefix), 2),
                        "warm_over_bare_prefix": round(med(warm) / med(bare_prefix), 3)},
            "throughput": run, "prefix_metrics": prefix_counters(scrape),
            "prompt_build": prompt_build(scrape)}


def prompt_build(scrape: str) -> dict[str, float] | None:
    """The mean and count of softprompt_prompt_build_seconds (vLLM engine only), or None."""
    count = metric(scrape, "softprompt_prompt_build_seconds_count")
    if not count:
        return None
    total = metric(scrape, "softprompt_prompt_build_seconds_sum")
    return {"requests": count, "mean_ms": round(1000 * total / count, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--virtual-tokens", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--samples", type=int, default=24, help="warm and bare TTFT samples")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (quick runs)")
    parser.add_argument("--template", default=None,
                        help="upload the adapters with this P-tuning template")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated: prefix-cache, no-prefix-cache")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="builtin",
                        help="the server's engine (vllm: vLLM installed)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown --modes {sorted(unknown)}; choose from {list(MODES)}")
    shape = GPT2_SMALL if args.layers is None else replace(GPT2_SMALL, layers=args.layers)
    workload = WORKLOAD.with_overrides(shape=shape, dtype=args.dtype, device=args.device,
                                       adapters=args.adapters,
                                       virtual_tokens=args.virtual_tokens)
    results: dict = {"workload": workload.to_json(), "template": args.template,
                     "engine": args.engine, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_model(shape, root / "model", dtype=args.dtype, device=args.device)
        for mode in modes:
            flags = MODES[mode]
            store = root / f"store-{mode}"
            populate(workload, store, args.template)
            server = ServerProcess(model, store, root / f"{mode}.log",
                                   "--max-virtual-tokens", str(args.virtual_tokens),
                                   "--max-wait-ms", "0", "--max-queue", str(4 * args.requests),
                                   "--tenant-max-concurrent-requests", str(4 * args.requests),
                                   "--log-level", "warning", *ENGINES[args.engine], *flags)
            server.args[server.args.index("--device") + 1] = args.device
            server.args[server.args.index("--dtype") + 1] = args.dtype
            server.start(timeout=180)  # within run_checks.sh's limit for this step
            try:
                with log_on_failure(server, f"long-prompts {mode}"):
                    results["runs"][mode] = asyncio.run(measure(server.url, args, shape.vocab))
            finally:
                server.stop()
            print(mode, json.dumps(results["runs"][mode]), flush=True)
    runs = results["runs"]
    shape_of = "prefix" if args.template is None else f"template {args.template!r}"
    print(f"\nlong-prompts ({args.virtual_tokens} virtual tokens as {shape_of}, {args.device}, "
          f"{args.dtype}, engine {args.engine})")
    print(f"{'':>18} {'warm TTFT':>10} {'bare TTFT':>10} {'warm/bare':>10} {'cold TTFT':>10} "
          f"{'tok/s':>8}")
    for mode, run in runs.items():
        t = run["ttft_ms"]
        print(f"{mode:>18} {t['warm_p50']:>8.1f}ms {t['bare_p50']:>8.1f}ms "
              f"{t['warm_over_bare']:>9.2f}x {t['cold_p50']:>8.1f}ms "
              f"{run['throughput']['tokens_per_s']:>8.1f}")
    for mode, run in runs.items():
        t = run["ttft_ms"]
        print(f"{mode:>18} bare model behind a {args.virtual_tokens}-token text: "
              f"{t['bare_prefix_p50']:.1f} ms (warm / that {t['warm_over_bare_prefix']:.2f}x)")
    for mode, run in runs.items():
        if run["prompt_build"] is not None:
            print(f"{mode:>18} prompt embeddings built in {run['prompt_build']['mean_ms']:.3f} ms "
                  f"on average ({run['prompt_build']['requests']:.0f} requests)")
    if len(runs) == 2:
        on, off = runs["prefix-cache"], runs["no-prefix-cache"]
        speedup = on["throughput"]["tokens_per_s"] / off["throughput"]["tokens_per_s"]
        print(f"throughput with the prefix cache / without: {speedup:.2f}x")
        results["throughput_ratio"] = round(speedup, 3)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
