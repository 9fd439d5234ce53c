"""Throughput against the number of distinct adapters in the batch (1 to 1,024), per engine.

The same requests (same prompt lengths, same output lengths, same batch size) are served by
the real server (`python -m server serve` on loopback, one streaming client per request, all
at once: the harness's http system) with their soft prompts drawn from 1, 4, ..., 1,024
distinct adapters, all resident (a warm-up round loads them), next to the bare model without
adapters. A server that serves one adapter per forward pass would fall as the count grows;
S-LoRA published this curve for LoRA. `--engine both` draws the builtin and the vllm engine
in one plot, one server after the other (vLLM installed; its CPU attention needs heads of 32
dimensions or more, which the default shape has).

    python -m benchmarks.plots.adapter_scaling                 # CPU: a small Llama shape
    python -m benchmarks.plots.adapter_scaling --engine both   # the builtin and vllm engines
    python -m benchmarks.plots.adapter_scaling --workload gpu-1b --device cuda

Writes docs/img/adapter-scaling.png and benchmarks/results/adapter-scaling.json with
`--engine both`, and adapter-scaling-<engine>.* for one engine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.engine_runner import settings_for
from benchmarks.harness.fixtures import RequestSpec, build_model, make_requests, populate_store
from benchmarks.harness.http_runner import HttpRunner
from benchmarks.harness.server_log import log_on_failure
from benchmarks.harness.vllm_peer import require_vllm
from benchmarks.harness.workloads import (
    WORKLOADS,
    ModelShape,
    Workload,
    check_vllm_shape,
    model_line,
)
from benchmarks.plots.figure import REPO, axes, commit

SMALL = ModelShape("llama", vocab=4096, hidden=256, layers=4, heads=8, kv_heads=4,
                   intermediate=768)
COUNTS = (1, 4, 16, 64, 256, 1024)
ENGINES = {"builtin": ("builtin",), "vllm": ("vllm",), "both": ("builtin", "vllm")}


def _workload(args: argparse.Namespace, counts: list[int]) -> Workload:
    if args.workload is None:
        base = Workload("adapter-scaling", "small Llama shape, float32 on the CPU", SMALL,
                        "float32", "cpu", requests=args.requests, adapters=1,
                        virtual_tokens=args.virtual_tokens, prompt_tokens=args.prompt_tokens,
                        new_tokens=args.new_tokens, max_batch_size=args.batch)
    else:
        base = WORKLOADS[args.workload].with_overrides(
            requests=args.requests, virtual_tokens=args.virtual_tokens,
            prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
            max_batch_size=args.batch)
    # Every count's adapters in one store, all resident in one prompt table.
    return replace(base, device=args.device or base.device, adapters=max(counts),
                   cache_adapters=max(counts))


def requests_for(workload: Workload, adapters: int | None) -> list[RequestSpec]:
    """The same prompts for every count, their soft prompts drawn round-robin from `adapters`
    distinct adapters; None: the bare model."""
    requests = make_requests(replace(workload, adapters=adapters or 1))
    return requests if adapters else [replace(r, adapter=None) for r in requests]


def _best(runner: HttpRunner, requests: list[RequestSpec], repeats: int) -> float:
    """Best tokens/s of `repeats` rounds of `requests` after a warm-up round (every adapter
    resident, every shape allocated)."""
    runner.requests = requests  # one server for every count: only the requests change
    runner.warm_up(with_adapters=True)
    best = 0.0
    for _ in range(repeats):
        run = runner.run(lambda _: None)
        best = max(best, run.tokens / run.seconds)
    return best


def _curve(engine: str, workload: Workload, model_dir: Path, store: Path, work: Path, *,
           counts: list[int], repeats: int) -> dict[str, Any]:
    """One server on `engine`: the bare model, then every count."""
    settings = settings_for(workload, model_dir, store, max_wait_ms=0.0, engine=engine)
    print(f"starting the server (--engine {engine}) ...", flush=True)
    runner = HttpRunner(settings, requests_for(workload, None), work / f"{engine}.log")
    try:
        with log_on_failure(runner.server, f"the server on --engine {engine}"):
            bare = _best(runner, requests_for(workload, None), repeats)
            print(f"{engine}: bare model: {bare:,.0f} tokens/s", flush=True)
            points = {}
            for n in counts:
                points[n] = _best(runner, requests_for(workload, n), repeats)
                print(f"{engine}: {n:>5} adapters: {points[n]:,.0f} tokens/s "
                      f"({points[n] / bare:.2f}x bare)", flush=True)
    finally:
        runner.close()
    return {"startup_s": runner.startup_s, "bare_tokens_per_s": bare,
            "tokens_per_s": {str(k): v for k, v in points.items()}}


def _plot(curves: dict[str, dict[str, Any]], out: Path, title: str) -> None:
    with axes(out, title) as ax:
        top = 0.0
        for k, (engine, curve) in enumerate(curves.items()):
            points = {int(n): v for n, v in curve["tokens_per_s"].items()}
            xs = sorted(points)
            color = f"C{k}"
            ax.plot(xs, [points[x] for x in xs], marker="o", color=color,
                    label=f"{engine} engine")
            ax.axhline(curve["bare_tokens_per_s"], color=color, linestyle="--",
                       label=f"{engine} engine, the bare model (no virtual tokens)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            top = max(top, *points.values(), curve["bare_tokens_per_s"])
        ax.set_ylim(0, top * 1.15)
        ax.set_xlabel("distinct adapters among the requests")
        ax.set_ylabel("generated tokens / s")
        ax.legend(loc="lower left", fontsize=8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default=None,
                        help="a named workload's model shape and dtype (default: a small "
                        "Llama shape in float32 on the CPU)")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="builtin",
                        help="the server's --engine, or both in turn (one line each; vllm: "
                             "vLLM installed)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="--max-batch-size")
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)))
    parser.add_argument("--png", type=Path, default=None,
                        help="default docs/img/adapter-scaling.png (--engine both), else "
                             "adapter-scaling-<engine>.png")
    parser.add_argument("--json", type=Path, default=None,
                        help="default benchmarks/results/adapter-scaling.json (--engine "
                             "both), else adapter-scaling-<engine>.json")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    engines = ENGINES[args.engine]
    name = "adapter-scaling" + ("" if args.engine == "both" else f"-{args.engine}")
    png = args.png or REPO / "docs/img" / f"{name}.png"
    out = args.json or REPO / "benchmarks/results" / f"{name}.json"
    workload = _workload(args, counts)
    if "vllm" in engines:  # refused before anything is built
        check_vllm_shape(workload)
        require_vllm("--engine vllm")
    measured_at = commit()
    with tempfile.TemporaryDirectory(prefix="adapter-scaling-") as tmp:
        work = Path(tmp)
        model_dir = build_model(workload.shape, work / "model", dtype=workload.dtype,
                                device=workload.device)
        populate_store(workload, work / "store")
        curves = {engine: _curve(engine, workload, model_dir, work / "store", work,
                                 counts=counts, repeats=args.repeats)
                  for engine in engines}
    device = (torch.cuda.get_device_name() if workload.device == "cuda"
              else f"{platform.processor() or platform.machine()} CPU, "
                   f"{torch.get_num_threads()} threads")
    title = (f"{workload.requests} requests, {workload.virtual_tokens} virtual + "
             f"{workload.prompt_tokens} in, {workload.new_tokens} out, batch "
             f"{workload.max_batch_size}, {workload.dtype}, the server over HTTP\n"
             f"{device}, commit {measured_at}")
    _plot(curves, png, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "workload": workload.to_json(), "model": model_line(workload), "commit": measured_at,
        "device": device, "engines": curves,
    }, indent=2) + "\n")
    print(f"wrote {png} and {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
