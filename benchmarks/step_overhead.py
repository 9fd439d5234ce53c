"""How much of a decode step is host work: Python, scheduling, per-row bookkeeping, delivery.

A near-free model (GPT-2 shape, one layer, hidden size 16) decodes `--rows` rows (64 by
default) through the engine's public client (`server.engine.engine.Engine`, as the HTTP layer
uses it), so the model's own compute is next to nothing and what is left is the host's cost of
a step; on a GPU that cost is what a launch-bound step cannot hide. A step's time is the
interval from one step to the next in which every row drew a token, as the engine reports
its steps to its observer: the whole loop (planning, the forward, sampling, stop conditions,
handing the deltas out), with the frontend's work on the requests' outputs running beside it
in the same process. It prints the median with greedy rows, with seeded sampled rows, and with
greedy rows that stream and have a stop string (the frontend decodes their text as they go).

    python -m benchmarks.step_overhead [--device cpu|cuda] [--rows 64] [--steps 200]
                                       [--torch-threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store import LocalAdapterStore  # noqa: E402
from benchmarks.harness.engine_runner import Recorder  # noqa: E402
from benchmarks.harness.fixtures import build_model  # noqa: E402
from benchmarks.harness.workloads import ModelShape  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.interface import (  # noqa: E402
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)

SHAPE = ModelShape("gpt2", vocab=259, hidden=16, layers=1, heads=2)  # a byte-level vocabulary
PROMPT = [5, 9, 17, 33, 65, 129, 257, 3]  # token ids: the benchmark tokenizer's "<t5> <t9> ..."
KINDS = (("greedy", "greedy"), ("sampled", "seeded top-k/top-p sampling"),
         ("streamed", "greedy, streamed, stop string"))
_ids = itertools.count()


def _params(kind: str, steps: int, i: int) -> SamplingParams:
    if kind == "sampled":
        return SamplingParams(max_new_tokens=steps, temperature=0.8, top_k=50, top_p=0.9,
                              seed=i, ignore_eos=True)
    stop = ("\n\n",) if kind == "streamed" else ()
    return SamplingParams(max_new_tokens=steps, ignore_eos=True, stop=stop)


async def _one(engine: Engine, kind: str, steps: int, i: int) -> int:
    request = GenerationRequest(request_id=f"overhead-{next(_ids)}", prompt_ids=tuple(PROMPT),
                                adapter_id=None, params=_params(kind, steps, i))
    if kind != "streamed":
        return (await engine.generate(request)).completion_tokens
    async for item in await engine.open_stream(request):  # text chunks, then the result
        if isinstance(item, GenerationResult):
            return item.completion_tokens
    raise RuntimeError("a stream ended without its result")


async def _round(engine: Engine, kind: str, rows: int, steps: int) -> None:
    drawn = await asyncio.gather(*(_one(engine, kind, steps, i) for i in range(rows)))
    if drawn != [steps] * rows:
        raise RuntimeError(f"{kind}: rows drew {sorted(set(drawn))} tokens, not {steps}")


def time_steps(engine: Engine, recorder: Recorder, kind: str, rows: int,
               steps: int) -> list[float]:
    """Seconds per decode step (every row drawing) over one round of `rows` requests."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_round(engine, kind, rows, 4))  # warm: this kind's first step
        time.sleep(0.2)  # the round's last step reports after its results: let it land
        recorder.reset()
        loop.run_until_complete(_round(engine, kind, rows, steps))
    finally:
        loop.close()
    # The recorder keeps only steps in which every row drew a token, timed from the step
    # before: rows joining or finishing make no decode step.
    return list(recorder.decode_steps)


def engine_for(model: Path, store: Path, device: str, rows: int, steps: int,
               recorder: Recorder, threads: int) -> Engine:
    settings = Settings(model=str(model), store=str(store), device=device, dtype="float32",
                        max_batch_size=rows, max_wait_ms=50, max_queue=4 * rows,
                        tenant_max_concurrent_requests=4 * rows,
                        max_model_len=len(PROMPT) + steps + 8, engine="builtin",
                        torch_threads=threads)
    engine = Engine(settings, LocalAdapterStore(store), observer=recorder)
    engine.start()
    engine.wait_until_ready(600)
    return engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="the server's --torch-threads (default 0: automatic)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="step-overhead-") as tmp:
        model = build_model(SHAPE, Path(tmp) / "model", dtype="float32", device=args.device)
        recorder = Recorder()
        engine = engine_for(model, Path(tmp) / "store", args.device, args.rows, args.steps,
                            recorder, args.torch_threads)
        try:
            print(f"host time per decode step, {args.rows} rows, near-free model (GPT-2 shape, "
                  f"1 layer, hidden 16), through the engine's client, device {args.device}, "
                  f"torch {torch.__version__}, {torch.get_num_threads()} threads; median over "
                  f"about {args.steps} steps")
            for kind, label in KINDS:
                times = time_steps(engine, recorder, kind, args.rows, args.steps)
                if not times:
                    raise RuntimeError(f"{kind}: no step had every row drawing a token")
                ordered = sorted(times)
                p90 = ordered[int(0.9 * (len(ordered) - 1))]
                print(f"  {label:30s} step {statistics.median(times) * 1e3:7.3f} ms "
                      f"(p90 {p90 * 1e3:.3f} ms, {len(times)} steps)")
        finally:
            engine.shutdown(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
