"""Throughput against the number of distinct adapters in the batch (1 to 1,024).

The same requests (same prompt lengths, same output lengths, same batch size) are served by
the engine with their soft prompts drawn from 1, 4, ..., 1,024 distinct adapters, all resident
(a warm-up round loads them), next to the bare model without adapters. A server that serves one
adapter per forward pass would fall as the count grows; S-LoRA published this curve for LoRA.

    python -m benchmarks.plots.adapter_scaling                 # CPU: a small Llama shape
    python -m benchmarks.plots.adapter_scaling --workload gpu-1b --device cuda

Writes docs/img/adapter-scaling.png and benchmarks/results/adapter-scaling.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.harness.engine_runner import EngineRunner, settings_for
from benchmarks.harness.fixtures import build_model, make_requests, populate_store
from benchmarks.harness.workloads import WORKLOADS, ModelShape, Workload
from benchmarks.plots.figure import REPO, axes, commit

SMALL = ModelShape("llama", vocab=4096, hidden=256, layers=4, heads=8, kv_heads=4,
                   intermediate=768)
COUNTS = (1, 4, 16, 64, 256, 1024)


def _workload(args: argparse.Namespace) -> Workload:
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
    return replace(base, device=args.device or base.device,
                   cache_adapters=max(COUNTS))


def _measure(workload: Workload, model_dir: Path, work: Path, *, adapters: int | None,
             repeats: int) -> float:
    """Best tokens/s of `repeats` rounds; adapters None: the bare model."""
    w = replace(workload, adapters=adapters or 1)
    store = work / f"store-{adapters}"
    if adapters:
        populate_store(w, store)
    requests = make_requests(w)
    if not adapters:
        requests = [replace(r, adapter=None) for r in requests]
    runner = EngineRunner(settings_for(w, model_dir, store, max_wait_ms=0.0), requests)
    try:
        runner.warm_up(with_adapters=True)  # every adapter resident, every shape allocated
        best = 0.0
        for _ in range(repeats):
            run = runner.run(lambda _: None)
            best = max(best, run.tokens / run.seconds)
        return best
    finally:
        runner.close()


def _plot(points: dict[int, float], bare: float, out: Path, title: str) -> None:
    with axes(out, title) as ax:
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label="softprompt-server engine")
        ax.axhline(bare, color="grey", linestyle="--",
                   label="the same requests on the bare model (no virtual tokens)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(0, max(max(points.values()), bare) * 1.15)
        ax.set_xlabel("distinct adapters among the requests")
        ax.set_ylabel("generated tokens / s")
        ax.legend(loc="lower left", fontsize=8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default=None,
                        help="a named workload's model shape and dtype (default: a small "
                        "Llama shape in float32 on the CPU)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="--max-batch-size")
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)))
    parser.add_argument("--png", type=Path, default=REPO / "docs/img/adapter-scaling.png")
    parser.add_argument("--json", type=Path,
                        default=REPO / "benchmarks/results/adapter-scaling.json")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    workload = _workload(args)
    with tempfile.TemporaryDirectory(prefix="adapter-scaling-") as tmp:
        work = Path(tmp)
        model_dir = build_model(workload.shape, work / "model", dtype=workload.dtype,
                                device=workload.device)
        bare = _measure(workload, model_dir, work, adapters=None, repeats=args.repeats)
        print(f"bare model: {bare:,.0f} tokens/s", flush=True)
        points = {}
        for n in counts:
            points[n] = _measure(workload, model_dir, work, adapters=n, repeats=args.repeats)
            print(f"{n:>5} adapters: {points[n]:,.0f} tokens/s ({points[n] / bare:.2f}x bare)",
                  flush=True)
    measured_at = commit()
    device = (torch.cuda.get_device_name() if workload.device == "cuda"
              else f"{platform.processor() or platform.machine()} CPU, "
                   f"{torch.get_num_threads()} threads")
    title = (f"{workload.requests} requests, {workload.virtual_tokens} virtual + "
             f"{workload.prompt_tokens} in, {workload.new_tokens} out, batch "
             f"{workload.max_batch_size}, {workload.dtype}\n{device}, commit {measured_at}")
    _plot(points, bare, args.png, title)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "workload": workload.to_json(), "commit": measured_at, "device": device,
        "bare_tokens_per_s": bare, "tokens_per_s": {str(k): v for k, v in points.items()},
    }, indent=2) + "\n")
    print(f"wrote {args.png} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
