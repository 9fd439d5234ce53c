"""What one forward pass of the continuous-batching loop costs, and what slows it down.

The fairness target (tenant B within 2x of idle while tenant A floods) depends on the cost
structure of the device, which this prints for builtin:tiny (or `--model`) on `--device`:

1. a prefill pass for n rows of a short prompt, and a decode step for n rows: how much of a
   pass is fixed cost, and how much a step's cost grows with its rows;
2. RunningBatch throughput with every row starting together (lockstep: one big prefill, then
   steps) against rows finishing and joining at every step (staggered, what a second tenant's
   traffic turns a flood into);
3. the staggered loop again while another Python thread holds the GIL for a share of the
   time, as the event loop does when it serves clients in the same process;
4. what moving rows in the shared KV cache costs at a realistic cache shape (`--move-shape
   rows,kv_heads,tokens,head_dim`, 4 layers, the model's dtype): 8 rows joining a batch that
   holds finished rows, and 8 rows parked;
5. a 32-row decode pass at several cache widths (`--widths`), with the cache in a KVSlab
   (each step's column written in place, what the loop runs) and in transformers'
   DynamicCache (concatenated: a copy of the whole cache per step).

    python -m benchmarks.engine_costs [--device cpu|cuda] [--seconds 3] [--busy 0,15,30]
                                      [--move-shape 32,8,512,128] [--widths 30,250,500,1000]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.config import Settings  # noqa: E402
from server.engine.decoding import RunningBatch  # noqa: E402
from server.engine.generation import BatchRow  # noqa: E402
from server.engine.interface import SamplingParams  # noqa: E402
from server.engine.model_loader import load_model  # noqa: E402

PROMPT = "Tweet: I love it. Label:"
NEW_TOKENS = 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def pass_costs(model, ids: list[int], device: torch.device, repeats: int,
               sizes: tuple[int, ...] = (1, 4, 8, 16, 32)) -> list[dict]:
    """Median ms of a prefill pass and of one decode step, per number of rows."""
    out = []
    with torch.inference_mode():
        for n in sizes:
            prompt = torch.tensor([ids] * n, device=device)
            prefill = _median_ms(lambda p=prompt: model(input_ids=p, use_cache=True,
                                                        logits_to_keep=1), device, repeats)
            cache = model(input_ids=prompt, use_cache=True).past_key_values
            nxt = torch.zeros(n, 1, dtype=torch.long, device=device)

            def step(c=cache, x=nxt) -> None:
                model(input_ids=x, past_key_values=c, use_cache=True, logits_to_keep=1)
                c.crop(-1)  # drop the step's token: the same width every time

            out.append({"rows": n, "prefill_ms": prefill,
                        "step_ms": _median_ms(step, device, repeats)})
    return out


def _rows(ids: tuple[int, ...], counter: itertools.count, n: int,
          new_tokens: Callable[[int], int]) -> list[tuple[int, BatchRow]]:
    return [(next(counter), BatchRow(prompt_ids=ids, prompt_embeds=None, params=SamplingParams(
        max_new_tokens=new_tokens(i), ignore_eos=True))) for i in range(n)]


def loop_throughput(model, tokenizer, ids: tuple[int, ...], *, staggered: bool, seconds: float,
                    rows: int = 32) -> dict:
    """Requests per second through one RunningBatch kept full, and its median pass times."""
    batch: RunningBatch[int] = RunningBatch(model, tokenizer)
    counter = itertools.count()
    steps: list[float] = []
    admits: list[float] = []
    done = 0
    # Staggered: the first rows want 1..8 tokens, so from then on some finish at every step.
    first: Callable[[int], int] = (lambda i: 1 + i % NEW_TOKENS) if staggered else (
        lambda i: NEW_TOKENS)
    pending, lengths = rows, first
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        if pending and (staggered or not len(batch)):
            t = time.perf_counter()
            left = batch.admit(_rows(ids, counter, pending, lengths))
            admits.append(time.perf_counter() - t)
            pending, lengths = len(left), (lambda i: NEW_TOKENS)
            done += len(left)
        if len(batch):
            t = time.perf_counter()
            left = batch.step()
            steps.append(time.perf_counter() - t)
            pending += len(left)
            done += len(left)
    wall = time.perf_counter() - started
    return {"requests_per_s": done / wall, "step_ms": statistics.median(steps) * 1000,
            "admit_ms": statistics.median(admits) * 1000,
            "rows_per_admit": rows if not staggered else None}


def cache_move_ms(shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype,
                  repeats: int, layers: int = 4) -> dict:
    """Median ms of moving rows in the running rows' KV cache at a realistic shape, with
    synthetic caches: 8 rows joining `shape[0]` rows of which every eighth has finished (they
    take the finished rows' places), and 8 rows parked out of them."""
    from transformers import DynamicCache

    from server.engine.decoding import _Group, _move, _Slot

    rows, heads, width, dim = shape

    def tensors(n: int, w: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        return ([torch.randn(n, heads, w, dim, device=device, dtype=dtype)
                 for _ in range(layers)],
                [torch.randn(n, heads, w, dim, device=device, dtype=dtype)
                 for _ in range(layers)],
                torch.ones(n, w, dtype=torch.long, device=device))

    def group(n: int, w: int) -> _Group:
        g: _Group = _Group()
        slots = [_Slot(handle=i, state=None, sampler=None, length=w - i % 5) for i in range(n)]
        g.add(slots, *tensors(n, w), torch.zeros(n, 1, dtype=torch.long, device=device),
              template=DynamicCache())
        return g

    join, park = [], []
    for _ in range(repeats + 1):
        running = group(rows, width)
        finished = list(range(0, rows, 8))
        for i in finished:
            running.slots[i].alive = False
        running.retired = len(finished)
        w = width * 3 // 4
        joiners = [_Slot(handle=-i, state=None, sampler=None, length=w) for i in range(8)]
        payload = tensors(8, w)
        _sync(device)
        started = time.perf_counter()
        running.add(joiners, *payload, torch.zeros(8, 1, dtype=torch.long, device=device),
                    template=DynamicCache())
        _sync(device)
        join.append(time.perf_counter() - started)
        parked: _Group = _Group()
        _sync(device)
        started = time.perf_counter()
        _move(running, list(range(1, rows, rows // 8))[:8], parked)
        _sync(device)
        park.append(time.perf_counter() - started)
    return {"join_ms": statistics.median(join[1:]) * 1000,
            "park_ms": statistics.median(park[1:]) * 1000}


def step_by_width(model, widths: list[int], device: torch.device, repeats: int,
                  rows: int = 32) -> list[dict]:
    """Median ms of a `rows`-row decode pass at each cache width, with the cache in a KVSlab
    (the step's column written in place, what the loop runs) and in transformers'
    DynamicCache (concatenated: a copy of the whole cache per step)."""
    import copy

    from server.engine.kv_slab import KVSlab

    out = []
    with torch.inference_mode():
        for width in widths:
            prompt = torch.full((rows, width), 5, device=device)
            cache = model(input_ids=prompt, use_cache=True).past_key_values
            token = torch.zeros(rows, 1, dtype=torch.long, device=device)
            position = torch.full((rows, 1), width, device=device)
            ones = torch.ones(rows, width + 1, dtype=torch.long, device=device)

            def concatenating(c=cache, x=token, p=position, m=ones) -> None:
                model(input_ids=x, attention_mask=m, position_ids=p, past_key_values=c,
                      use_cache=True, logits_to_keep=1)
                c.crop(-1)  # drop the step's token: the same width every time

            slab = KVSlab()
            slab.put(range(rows), [layer.keys for layer in cache.layers],
                     [layer.values for layer in cache.layers], ones[:, :width])
            slabbed = copy.copy(cache)
            slabbed.layers = slab.layers

            def in_place(c=slabbed, s=slab, x=token, p=position) -> None:
                model(input_ids=x, attention_mask=s.step_mask(), position_ids=p,
                      past_key_values=c, use_cache=True, logits_to_keep=1)
                s.advance(0)  # not advanced: the next pass writes the same column

            out.append({"width": width, "in_place_ms": _median_ms(in_place, device, repeats),
                        "concatenating_ms": _median_ms(concatenating, device, repeats)})
    return out


class GilHolder:
    """A thread that holds the GIL (pure Python work) `busy` percent of each millisecond."""

    def __init__(self, busy: int) -> None:
        self._busy_s, self._stop = busy / 100_000, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            while time.perf_counter() - started < self._busy_s:
                sum(range(50))
            time.sleep(0.001 - self._busy_s)

    def __enter__(self) -> GilHolder:
        if self._busy_s:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._busy_s:
            self._thread.join()


def run(*, device: str, model: str, seconds: float, busy: list[int], repeats: int,
        move_shape: tuple[int, int, int, int] = (32, 8, 512, 128),
        widths: tuple[int, ...] = (30, 250, 500, 1000)) -> dict:
    with tempfile.TemporaryDirectory() as store:
        loaded = load_model(Settings(store=store, device=device, dtype="auto", model=model))
    ids = tuple(loaded.tokenizer(PROMPT)["input_ids"])
    m, tok, dev = loaded.model, loaded.tokenizer, loaded.device
    result = {"device": str(dev), "dtype": loaded.info.dtype, "model": model,
              "prompt_tokens": len(ids), "passes": pass_costs(m, list(ids), dev, repeats),
              "lockstep": loop_throughput(m, tok, ids, staggered=False, seconds=seconds),
              "staggered": {}}
    for share in busy:
        with GilHolder(share):
            result["staggered"][share] = loop_throughput(m, tok, ids, staggered=True,
                                                         seconds=seconds)
    result["cache_move"] = {"shape": list(move_shape),
                            **cache_move_ms(move_shape, dev, m.dtype, max(3, repeats // 6))}
    result["step_by_width"] = step_by_width(m, list(widths), dev, max(5, repeats // 2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--busy", default="0,15,30",
                        help="GIL-holding shares (percent) of a second Python thread")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--move-shape", default="32,8,512,128",
                        help="rows,kv_heads,tokens,head_dim of the cache-move measurement")
    parser.add_argument("--widths", default="30,250,500,1000",
                        help="cache widths (tokens) of the 32-row step measurement")
    args = parser.parse_args()
    rows, heads, width, dim = (int(x) for x in args.move_shape.split(","))
    r = run(device=args.device, model=args.model, seconds=args.seconds,
            busy=[int(b) for b in args.busy.split(",")], repeats=args.repeats,
            move_shape=(rows, heads, width, dim),
            widths=tuple(int(w) for w in args.widths.split(",")))
    print(f"{r['model']} on {r['device']} ({r['dtype']}), prompt {r['prompt_tokens']} tokens, "
          f"{NEW_TOKENS} new tokens")
    print("rows  prefill pass  decode step")
    for p in r["passes"]:
        print(f"{p['rows']:4d}  {p['prefill_ms']:9.2f} ms  {p['step_ms']:8.2f} ms")
    lock = r["lockstep"]
    print(f"lockstep (32 rows start together): {lock['requests_per_s']:6.0f} req/s, "
          f"step {lock['step_ms']:.2f} ms, 32-row prefill {lock['admit_ms']:.2f} ms")
    for share, s in r["staggered"].items():
        print(f"staggered (rows join every step), another thread holding the GIL {share:2d}%: "
              f"{s['requests_per_s']:6.0f} req/s, step {s['step_ms']:.2f} ms, "
              f"prefill {s['admit_ms']:.2f} ms")
    move = r["cache_move"]
    print(f"cache {'x'.join(map(str, move['shape']))} x 4 layers in {r['dtype']}: 8 rows joining "
          f"{move['shape'][0]} with every eighth finished {move['join_ms']:.2f} ms, "
          f"8 rows parked {move['park_ms']:.2f} ms")
    print("32-row decode pass by cache width: in place (KVSlab) / concatenating "
          "(DynamicCache)")
    for w in r["step_by_width"]:
        print(f"{w['width']:6d} tokens  {w['in_place_ms']:8.2f} ms  "
              f"{w['concatenating_ms']:8.2f} ms")


if __name__ == "__main__":
    main()
