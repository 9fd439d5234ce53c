"""The vLLM core: requests admitted by tenant share, compiled into vLLM prompts, run by vLLM's
AsyncLLM, their outputs handed to the frontend as RowDeltas (server.engine.core_client).

Each request is one task on the event loop: it waits for admission, gets its adapter's rows
(server.engine.vllm.soft_prompts), then reads vLLM's output deltas into the queue its
Submission reads. Aborting it (a client gone, a stop string found) cancels the task, and
vLLM drops the request with it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from server.engine.errors import (
    EngineError,
    EngineNotReadyError,
    GenerationError,
    InvalidRequestError,
)
from server.engine.heartbeat import Heartbeat
from server.engine.interface import EngineProgress, GenerationRequest
from server.engine.observer import EngineObserver
from server.engine.prompt_layout import Layout, anchor_tokens
from server.engine.tickets import Failure, RowDeltaStream
from server.engine.vllm.admission import Admission
from server.engine.vllm.prompts import (
    compile_prompt,
    placeholder_for,
    refuse_unsupported,
    sampling_params,
    to_delta,
    vllm_prompt,
)
from server.engine.vllm.soft_prompts import SoftPrompts

log = logging.getLogger(__name__)


class VllmCore:
    """Implements server.engine.core_client.CoreClient over an AsyncLLM."""

    name = "vllm"

    def __init__(self, llm: Any, *, prompts: SoftPrompts, admission: Admission,
                 observer: EngineObserver, vocab_size: int, prompt_capacity: int) -> None:
        self.llm = llm
        self.prompts = prompts
        self.admission = admission
        self.observer = observer
        self.vocab_size = vocab_size
        self.prompt_capacity = prompt_capacity
        self.heartbeat = Heartbeat("the vllm engine")
        self.heartbeat.rest()
        self._live: dict[str, VllmRequest] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """vLLM's engine is running once built (server.engine.vllm.runtime)."""

    def submit(self, request: GenerationRequest, *, version: str | None, virtual_tokens: int,
               stream: bool, layout: Layout | None) -> VllmRequest:
        if self._stopping or not self.alive:
            raise EngineNotReadyError("the engine is shutting down")
        refuse_unsupported(request.params, virtual=virtual_tokens)
        if request.request_id in self._live:
            raise InvalidRequestError(
                f"request id {request.request_id!r} is already in flight; ids must be unique")
        self.admission.check()
        self._loop = asyncio.get_running_loop()
        if not self._live:
            self.heartbeat.wake()
        handle = VllmRequest(self, request, version=version, virtual_tokens=virtual_tokens,
                             layout=layout, vllm_id=f"{request.request_id}#{next(self._ids)}")
        self._live[request.request_id] = handle
        return handle

    def forget(self, handle: VllmRequest) -> None:
        if self._live.get(handle.request_id) is handle:
            del self._live[handle.request_id]
        if not self._live:
            self.heartbeat.rest()

    def abort(self, request_id: str) -> None:
        handle = self._live.get(request_id)
        if handle is not None:
            handle.abort()

    def invalidate(self, namespace: str, adapter_id: str, *,
                   version: str | None = None) -> bool:
        return self.prompts.invalidate(namespace, adapter_id, version=version)

    def resident_versions(self) -> dict[tuple[str, str], str]:
        return self.prompts.resident_versions()

    @property
    def alive(self) -> bool:
        return not self._stopping and not getattr(self.llm, "errored", False)

    def stalled(self, bound_s: float) -> bool:
        return self.heartbeat.stalled(len(self._live), bound_s)

    def progress(self) -> EngineProgress:
        return self.heartbeat.progress(len(self._live))

    def begin_drain(self) -> None:
        """Nothing waits for batch mates here: the admission lets requests in at once."""

    def stop(self, timeout: float) -> None:
        """From a thread other than the event loop's: refuse new requests, let the running
        ones finish for up to `timeout` s, abort the rest, shut vLLM down."""
        self._stopping = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.admission.close)
        deadline = time.monotonic() + timeout
        while self._live and time.monotonic() < deadline:
            time.sleep(0.05)
        if loop is not None and not loop.is_closed():
            for handle in list(self._live.values()):
                loop.call_soon_threadsafe(handle.fail, EngineNotReadyError(
                    "the engine shut down before this request finished"))
        try:
            self.llm.shutdown()
        except Exception as e:  # noqa: BLE001 - shutting down: say so and go on
            log.warning("vllm engine shutdown: %s: %s", type(e).__name__, e)

    def stats(self) -> dict[str, float]:
        return {"queue_depth": float(self.admission.queued),
                "in_flight": float(len(self._live)), "parked": 0.0, **self.prompts.stats()}

    def tenant_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for tenant, n in self.admission.waiting().items():
            counts.setdefault(tenant, {"queued": 0, "running": 0})["queued"] += n
        for tenant, n in self.admission.running().items():
            counts.setdefault(tenant, {"queued": 0, "running": 0})["running"] += n
        return counts


class VllmRequest(RowDeltaStream):
    """A submitted request: the Submission the frontend reads, and the task that runs it."""

    def __init__(self, core: VllmCore, request: GenerationRequest, *, version: str | None,
                 virtual_tokens: int, layout: Layout | None, vllm_id: str) -> None:
        super().__init__(asyncio.Queue(), self.abort)
        self._core = core
        self._request = request
        self.request_id = request.request_id
        self._version = version
        self.virtual_tokens = virtual_tokens
        self._layout = layout
        self.prompt_tokens = len(request.prompt_ids) + (
            anchor_tokens(layout) if layout is not None else 0)
        self._vllm_id = vllm_id
        self._submitted = time.monotonic()
        self._ended = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    def abort(self) -> None:
        """Stop it (no-op once it ended); a reader waiting on it gets CancelledError."""
        self._end(None)

    def fail(self, error: BaseException) -> None:
        self._end(Failure(error))

    def _end(self, item: Failure | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._queue.put_nowait(item)
        self._task.cancel()
        self._core.forget(self)

    async def _run(self) -> None:
        core, request = self._core, self._request
        tenant = request.namespace
        try:
            await core.admission.acquire(tenant)
        except asyncio.CancelledError:
            return
        except Exception as e:  # noqa: BLE001 - the engine is shutting down
            self.fail(e)
            return
        try:
            core.observer.queue_wait(time.monotonic() - self._submitted, tenant=tenant)
            await self._generate()
        except asyncio.CancelledError:
            pass
        except EngineError as e:
            self.fail(e)
        except Exception as e:  # noqa: BLE001 - vLLM's own failure: this request's error
            log.warning("request %s failed in vllm: %s: %s", self.request_id,
                        type(e).__name__, e)
            self.fail(GenerationError(f"generation failed for this request: "
                                      f"{type(e).__name__}: {e}"))
        finally:
            core.admission.release(tenant)
            if not self._ended:
                self._ended = True
                core.forget(self)

    async def _generate(self) -> None:
        core, request = self._core, self._request
        params = request.params
        rows = None
        if request.adapter_id is not None:
            assert self._version is not None
            rows = await core.prompts.get(request.namespace, request.adapter_id, self._version)
        building = time.perf_counter()
        compiled = compile_prompt(request.prompt_ids, self.virtual_tokens, self._layout,
                                  placeholder=placeholder_for(params, core.vocab_size))
        prompt = vllm_prompt(compiled, rows, cache_salt=request.namespace)
        core.observer.prompt_built(time.perf_counter() - building)
        vparams = sampling_params(params, seed=params.seed)
        first = True
        async for output in core.llm.generate(prompt, vparams, request_id=self._vllm_id):
            core.heartbeat.beat()
            if output.outputs[0].finish_reason == "abort":
                self.abort()
                return
            delta = to_delta(output, params=params, compiled=compiled, first=first)
            if first:
                core.observer.first_token(time.monotonic() - self._submitted,
                                          tenant=request.namespace)
                first = False
            if self._ended:
                return
            self._queue.put_nowait(delta)
            if delta.finish_reason is not None:
                self._ended = True
                core.forget(self)
                return
