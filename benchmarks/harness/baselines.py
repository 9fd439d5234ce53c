"""The baselines, run in the same process and run as the engine: plain Hugging Face generate
(the cost floor of eager generate), HF's static KV cache with its compiled decode steps (the
best a Hugging Face user does alone), PEFT one request at a time with set_adapter (what users do
today), and PEFT batched with a single adapter (the best PEFT can do, but for one tenant only).

All requests arrive at t=0; a request's latency is from t=0 to the end of the generate call
that produced it, so a queue of sequential requests shows up in the percentiles.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from benchmarks.harness.fixtures import RequestSpec, dtype_of, write_adapter_dir
from benchmarks.harness.results import Run
from benchmarks.harness.workloads import Workload


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _FirstToken(StoppingCriteria):
    """Notes when generate produced its first token; never stops anything."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> torch.BoolTensor:
        if self.at is None:
            _sync(self.device)
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(model: Any, rows: list[list[int]], new_tokens: int, device: str,
              pad: int, **generate_kw: Any) -> float | None:
    """One generate over equal-length rows, exactly new_tokens each; the first token's time."""
    ids = torch.tensor(rows, device=device)
    first = _FirstToken(device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad,
                             stopping_criteria=StoppingCriteriaList([first]), **generate_kw)
    assert out.shape[1] == ids.shape[1] + new_tokens, "generation length was not forced"
    return first.at


def _chunks(requests: list[RequestSpec], size: int) -> list[list[RequestSpec]]:
    return [requests[i:i + size] for i in range(0, len(requests), size)]


class Baselines:
    """One base model (in the workload's dtype and device) shared by every baseline."""

    def __init__(self, workload: Workload, model_dir: Path, adapter_root: Path,
                 requests: list[RequestSpec]) -> None:
        self.w, self.requests, self.adapter_root = workload, requests, adapter_root
        self.device = workload.device
        self.pad = workload.shape.vocab - 1
        self.base = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype_of(workload.dtype)).to(self.device).eval()
        self._peft: Any = None
        self._turn = 0

    def runner(self, name: str) -> Callable[[Callable[[int], None]], Run]:
        return {"plain": self.plain, "hf-static-compile": self.hf_static_compile,
                "peft-sequential": self.peft_sequential,
                "peft-batched": self.peft_batched}[name]

    def warm_up(self, name: str) -> None:
        """Allocations and kernels once, on one batch of 2 tokens (not a whole run); PEFT also
        loads its adapters here."""
        chunk = self.requests[:self.w.max_batch_size]
        if name == "plain":
            filler = [1] * self.w.virtual_tokens
            _generate(self.base, [list(r.prompt_ids) + filler for r in chunk], 2, self.device,
                      self.pad)
            return
        if name == "hf-static-compile":  # compiles for the run's shapes: a whole batch
            filler = [1] * self.w.virtual_tokens
            _generate(self.base, [list(r.prompt_ids) + filler for r in chunk],
                      max(r.new_tokens for r in chunk), self.device, self.pad,
                      cache_implementation="static")
            return
        peft = self._peft_model()
        peft.set_adapter("a0")
        rows = [list(r.prompt_ids) for r in (chunk[:1] if name == "peft-sequential" else chunk)]
        _generate(peft, rows, 2, self.device, self.pad)

    # ---- plain generate: the same lengths, no adapters ------------------------------------

    def plain(self, tick: Callable[[int], None]) -> Run:
        """Rows of prompt + as many extra ids as the adapter has virtual tokens, batches of
        max_batch_size in arrival order, each run to its longest request (static batching)."""
        filler = [1 + (i % (self.pad - 1)) for i in range(self.w.virtual_tokens)]
        return self._batched(self.base, lambda r: list(r.prompt_ids) + filler, tick)

    # ---- HF static cache + torch.compile: the best a Hugging Face user does alone ----------

    def hf_static_compile(self, tick: Callable[[int], None]) -> Run:
        """plain's rows and batches with transformers' static KV cache, whose decode steps
        `generate` itself compiles on CUDA (torch.compile, mode "reduce-overhead": CUDA
        graphs), the prefill staying eager, as transformers means it to be used. Compiling
        the model's forward by hand instead would compile the prefill too, where the static
        cache is created and cannot be marked static, and lose the CUDA graphs. On the CPU
        generate does not compile: the figure is the static cache's alone."""
        filler = [1 + (i % (self.pad - 1)) for i in range(self.w.virtual_tokens)]
        return self._batched(self.base, lambda r: list(r.prompt_ids) + filler, tick,
                             cache_implementation="static")

    # ---- PEFT ---------------------------------------------------------------------------------

    def _peft_model(self) -> Any:
        """All adapters the workload uses, up front where there are few (at most 1,000);
        with more, peft_sequential loads each on first use, as a PEFT server would have to."""
        if self._peft is None:
            from peft import PeftModel

            first = write_adapter_dir(self.w, 0, self.adapter_root)
            self._peft = PeftModel.from_pretrained(self.base, str(first), adapter_name="a0")
            if self.w.adapters <= 1000:
                for i in sorted({r.adapter for r in self.requests} - {0, None}):
                    self._ensure_adapter(i)
            self._peft.eval()
        return self._peft

    def _ensure_adapter(self, index: int) -> None:
        name = f"a{index}"
        if name not in self._peft.peft_config:
            self._peft.load_adapter(str(write_adapter_dir(self.w, index, self.adapter_root)),
                                    adapter_name=name)

    def peft_sequential(self, tick: Callable[[int], None]) -> Run:
        """One request at a time: set_adapter, generate. With peft_sample set, only that many
        requests are timed (a different slice each run) and the per-token time is extrapolated
        to the whole workload, latencies included."""
        peft = self._peft_model()
        n = len(self.requests)
        sample = min(n, self.w.peft_sample or n)
        start_at = (self._turn * sample) % n
        self._turn += 1
        timed = [self.requests[(start_at + k) % n] for k in range(sample)]
        durations, ttfts = [], []
        for req in timed:
            _sync(self.device)
            started = time.perf_counter()
            if req.adapter is None:
                with peft.disable_adapter():
                    first = _generate(peft, [list(req.prompt_ids)], req.new_tokens,
                                      self.device, self.pad)
            else:
                self._ensure_adapter(req.adapter)
                peft.set_adapter(f"a{req.adapter}")
                first = _generate(peft, [list(req.prompt_ids)], req.new_tokens, self.device,
                                  self.pad)
            _sync(self.device)
            durations.append(time.perf_counter() - started)
            ttfts.append((first or time.perf_counter()) - started)
            tick(1)
        if sample < n:
            tick(n - sample)
        per_token = sum(durations) / sum(r.new_tokens for r in timed)
        ttft_one = sum(ttfts) / len(ttfts)
        latencies, ttft, clock = [], [], 0.0
        for req in self.requests:  # served in arrival order, one after another
            ttft.append(clock + ttft_one)
            clock += req.new_tokens * per_token if sample < n else durations[req.index]
            latencies.append(clock)
        return Run(seconds=clock, tokens=sum(r.new_tokens for r in self.requests),
                   requests=n, latencies_s=latencies, ttft_s=ttft,
                   extrapolated_from=sample if sample < n else None)

    def peft_batched(self, tick: Callable[[int], None]) -> Run:
        """PEFT's own batching: every row with adapter a0 (one tenant), batches of
        max_batch_size in arrival order."""
        peft = self._peft_model()
        peft.set_adapter("a0")
        return self._batched(peft, lambda r: list(r.prompt_ids), tick)

    def _batched(self, model: Any, row_of: Callable[[RequestSpec], list[int]],
                 tick: Callable[[int], None], **generate_kw: Any) -> Run:
        latencies, ttfts = [], []
        chunks = _chunks(self.requests, self.w.max_batch_size)
        _sync(self.device)
        t0 = time.perf_counter()
        for chunk in chunks:
            first = _generate(model, [row_of(r) for r in chunk],
                              max(r.new_tokens for r in chunk), self.device, self.pad,
                              **generate_kw)
            _sync(self.device)
            done = time.perf_counter() - t0
            latencies += [done] * len(chunk)
            ttfts += [((first or t0) - t0)] * len(chunk)
            tick(len(chunk))
        seconds = time.perf_counter() - t0
        steps = sum(len(c) * max(r.new_tokens for r in c) for c in chunks)
        useful = sum(r.new_tokens for r in self.requests)
        return Run(seconds=seconds, tokens=useful, requests=len(self.requests),
                   latencies_s=latencies, ttft_s=ttfts,
                   extra={"row_steps": steps, "wasted_row_steps_pct": 100 * (1 - useful / steps)})
