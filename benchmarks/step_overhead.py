"""How much of a decode step is host work: Python, scheduling, per-row bookkeeping.

A near-free model (GPT-2 shape, one layer, hidden size 16) decodes `--rows` rows (64 by
default) through the engine core (one forward over the step's tokens laid end to end, KV in
fixed per-row slots, sampling on the device), so the model's own compute is next to nothing
and what is left is the host's cost of a step; on a GPU that cost is what a launch-bound step
cannot hide. It prints the median wall time of a step with greedy rows and with seeded sampled
rows, split into the forward and the rest, and with greedy rows that stream and have a stop
string: the engine thread only hands their new ids out, one delta per row per step (the
frontend decodes them elsewhere).

    python -m benchmarks.step_overhead [--device cpu|cuda] [--rows 64] [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForCausalLM, GPT2Config  # noqa: E402

from server.engine.byte_tokenizer import (  # noqa: E402
    BOS_ID,
    BYTE_VOCAB_SIZE,
    EOS_ID,
    PAD_ID,
    make_byte_tokenizer,
)
from server.engine.core.engine_core import EngineCore  # noqa: E402
from server.engine.core.kv_cache import SlotKVCache, cache_shape  # noqa: E402
from server.engine.interface import SamplingParams  # noqa: E402
from server.engine.prompt_table import PromptTable, install  # noqa: E402
from server.engine.rows import BatchRow  # noqa: E402

PROMPT = "Tweet: I love it. Label:"


def _model(device: str) -> torch.nn.Module:
    config = GPT2Config(vocab_size=BYTE_VOCAB_SIZE, n_embd=16, n_layer=1, n_head=2,
                        n_positions=1024, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                        eos_token_id=EOS_ID)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device).eval()


def _params(kind: str, steps: int, i: int) -> SamplingParams:
    if kind == "sampled":
        return SamplingParams(max_new_tokens=steps + 8, temperature=0.8, top_k=50, top_p=0.9,
                              seed=i, ignore_eos=True)
    stop = ("\n\n",) if kind == "streamed" else ()
    return SamplingParams(max_new_tokens=steps + 8, ignore_eos=True, stop=stop)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(step: Callable[[], object], steps: int, device: str) -> list[float]:
    times = []
    for _ in range(steps):
        _sync(device)
        started = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - started)
    return times


def time_core(device: str, rows: int, steps: int,
              kind: str) -> tuple[list[float], list[float]]:
    """(step times, forward times)."""
    model, tokenizer = _model(device), make_byte_tokenizer()
    table = PromptTable(vocab_size=BYTE_VOCAB_SIZE, hidden=16, capacity_bytes=1 << 16,
                        dtype=torch.float32, device=device)
    install(model, table)
    # One slot more than rows: on CUDA padded decode steps keep one as scratch.
    cache = SlotKVCache(cache_shape(model.config), slots=rows + 1, max_len=steps + 64,
                        dtype=torch.float32, device=device)
    core: EngineCore[int] = EngineCore(model, tokenizer, cache, max_batch_tokens=rows * 64)
    ids = tokenizer(PROMPT)["input_ids"]
    outbox: list[object] = []  # what the scheduler collects for the frontend each step
    for i in range(rows):
        core.add(i, BatchRow(ids, None, _params(kind, steps, i), on_delta=outbox.append,
                             live=kind == "streamed"), ids)
    core.step()  # every prefill in one step
    forward_times: list[float] = []
    # Decode-only steps go through the decode graphs where there are some (CUDA): there the
    # "forward" is a graph's replay with the copy of its inputs, not a Python forward.
    graphs = core.decode_graphs
    inner = graphs.run if graphs is not None else core._forward

    def timed_forward(*args, **kwargs):
        _sync(device)
        started = time.perf_counter()
        out = inner(*args, **kwargs)
        _sync(device)
        forward_times.append(time.perf_counter() - started)
        return out

    if graphs is not None:
        graphs.run = timed_forward  # type: ignore[method-assign]
    else:
        core._forward = timed_forward  # type: ignore[method-assign]
    times = _timed(core.step, steps, device)
    if len(forward_times) != len(times):
        raise RuntimeError(f"{len(forward_times)} forwards timed in {len(times)} steps")
    return times, forward_times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    print(f"host time per decode step, {args.rows} rows, near-free model (GPT-2 shape, 1 layer, "
          f"hidden 16), device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median over {args.steps} steps")
    for kind, label in (("greedy", "greedy"), ("sampled", "seeded top-k/top-p sampling"),
                        ("streamed", "greedy, streamed, stop string")):
        step, forward = time_core(args.device, args.rows, args.steps, kind)
        core, fwd = statistics.median(step) * 1e3, statistics.median(forward) * 1e3
        print(f"  {label:30s} step {core:7.3f} ms "
              f"(forward {fwd:.3f} ms, the rest {core - fwd:.3f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
