"""RemoteEngine: the EngineClient of an HTTP process whose engine runs in a child process.

With --engine-process the model, scheduler, prompt cache and adapter store work live in a
child process (server.engine.worker) and this side keeps only the tokenizer, so the event
loop's Python work and the decode loop's no longer share a GIL. Requests, aborts, adapter
calls and shutdown go down one pipe; token-id deltas, metric events and gauges come back up
it (server.engine.wire) to a reader thread, which decodes them (deltas into RowDeltas) and
hands them to each request's event loop through its Mailbox. Text is made here, by the
frontend (server.engine.output_processor): the engine process only computes tokens, and a
stop string found here aborts the row there.
Gauges (/metrics) are as of the engine's last report, at most
server.engine.worker.STATS_PERIOD_S old; readiness (/readyz) at most READY_PERIOD_S.
Every message from the engine process is a heartbeat (it reports at least every
STATS_PERIOD_S): while requests or calls wait on it and it stays silent longer than
--engine-stall-timeout-s (stopped, or wedged), this side is not ready, until it speaks again.

If the engine process dies, every waiting request fails with a 503 and wait_until_exited()
returns, so the CLI can exit and let the orchestrator restart the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from adapters_store.records import AdapterRecord
from server.config import Batching, Settings
from server.engine import wire
from server.engine.errors import EngineNotReadyError, InvalidRequestError
from server.engine.frontend import Frontend
from server.engine.heartbeat import Heartbeat
from server.engine.interface import (
    AdapterUpload,
    EngineProgress,
    GenerationRequest,
    ModelInfo,
)
from server.engine.model_source import load_tokenizer, model_source
from server.engine.observer import CacheEvent, EngineObserver, GuardedObserver, NullObserver
from server.engine.remote_requests import Pending, RemoteDeltas

log = logging.getLogger(__name__)


class RemoteEngine(Frontend):
    """Implements EngineClient over a pipe to server.engine.worker in a child process."""

    def __init__(self, settings: Settings, *, observer: EngineObserver | None = None) -> None:
        super().__init__()
        self.settings = settings
        self._observer = GuardedObserver(observer or NullObserver())
        self._process: subprocess.Popen | None = None
        self._conn: Any = None
        self._send_lock = threading.Lock()
        # Every submission and call has a key of its own on the pipe (a request id may be
        # used again once its request is over, while the engine still tidies up the old one).
        self._pending: dict[str, Pending] = {}
        self._by_request: dict[str, str] = {}  # request id -> key, while in flight
        self._pending_lock = threading.Lock()
        self._keys = itertools.count()
        self._heartbeat = Heartbeat("the engine process")  # beats on every message from it
        self._tokenizer: Any = None
        self._info: ModelInfo | None = None
        self._batching: Batching | None = None
        self._engine_ready = threading.Event()  # the engine process said ready or failed
        # Frontend._loaded_event: ... and the tokenizer is loaded here
        self._exited = threading.Event()
        self._closing = False
        # Until the engine's first report: nothing queued or running (what the drain reads).
        self._stats: dict[str, float] = {
            "queue_depth": 0.0, "queue_capacity": float(settings.max_queue), "in_flight": 0.0,
            "parked": 0.0, "cache_capacity_bytes": float(settings.prompt_cache_bytes)}
        self._tenants: dict[str, dict[str, int]] = {}
        self._ready = False
        self._started = False

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine process and load the tokenizer here; returns immediately."""
        if self._started:
            return
        self._started = True
        ours, theirs = socket.socketpair()
        data = self.settings.model_dump(mode="json")
        data["api_keys"] = None  # the HTTP process authenticates; the engine never reads keys
        # A fresh interpreter, not multiprocessing: fork would copy threads (and CUDA state),
        # and spawn would re-run the parent's __main__ module in the child.
        self._process = subprocess.Popen(
            [sys.executable, "-m", "server.engine.worker", str(theirs.fileno()),
             json.dumps(data)], pass_fds=(theirs.fileno(),))
        theirs.close()
        self._conn = Connection(ours.detach())
        threading.Thread(target=self._read, name="engine-pipe-reader", daemon=True).start()
        threading.Thread(target=self._load_tokenizer, name="tokenizer-loader",
                         daemon=True).start()

    def _load_tokenizer(self) -> None:
        try:
            self._tokenizer = load_tokenizer(model_source(self.settings),
                                             name=self.settings.model)
        except BaseException as e:  # noqa: BLE001 - reported through wait_until_ready
            self._load_error = self._load_error or e
        self._engine_ready.wait()
        self._loaded_event.set()

    def wait_until_exited(self, timeout: float | None = None) -> bool:
        """True once the engine process is gone (after shutdown, or because it died)."""
        return self._exited.wait(timeout)

    @property
    def batching(self) -> Batching | None:
        return self._batching

    def is_ready(self) -> bool:
        """The engine process said it is ready and has not gone silent while work waits."""
        return (self._ready and not self._closing and not self._exited.is_set()
                and self._info is not None and self._tokenizer is not None
                and not self._heartbeat.stalled(len(self._pending),
                                                self.settings.engine_stall_timeout_s))

    def progress(self) -> EngineProgress:
        """Requests and calls waiting on the engine process, and how long it has sent
        nothing while they waited (its engine thread's own stall arrives as readiness)."""
        return self._heartbeat.progress(len(self._pending))

    def begin_drain(self) -> None:
        """As Engine.begin_drain, in the engine process."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                self._send({"op": "drain"})

    def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let the engine process finish in-flight ones (aborting them
        past `timeout`), and wait for it to exit."""
        self._closing = True
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(OSError):
                self._send({"op": "shutdown", "timeout": timeout})
        try:
            process.wait(timeout + 30)  # the drain, plus the engine's own teardown
        except subprocess.TimeoutExpired:
            log.error("the engine process did not exit %.0f s after shutdown; killing it",
                      timeout + 30)
            process.kill()
            process.wait(10)
        self._exited.wait(5)  # the reader has failed whatever was still waiting

    # ---- the pipe -----------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        self._send_bytes(wire.dumps([message]))

    def _send_bytes(self, data: bytes) -> None:
        with self._send_lock:
            self._conn.send_bytes(data)

    def _read(self) -> None:
        """The reader thread: every message from the engine process, until the pipe closes."""
        try:
            while True:
                data = self._conn.recv_bytes()
                self._heartbeat.beat()
                for message in wire.loads(data):
                    self._on_message(message)
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("engine pipe: a message could not be handled; closing the pipe")
        self._on_exit()

    def _on_message(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "events":
            for event in message["events"]:
                self._replay(event)
        elif op == "stats":
            self._stats, self._tenants = message["stats"], message["tenants"]
            self._ready = bool(message["ready"])
        elif op in ("accepted", "delta", "error", "cancelled", "reply"):
            key = message["key"]
            going_on = op == "accepted" or (
                op == "delta" and message["delta"].get("finish_reason") is None)
            with self._pending_lock:
                pending = self._pending.get(key) if going_on else self._pop(key)
            if pending is not None:  # None: aborted here already
                pending.deliver(message)
        elif op == "ready":
            self._info = wire.info_from_wire(message["info"])
            self._batching = Batching(message["batching"]) if message["batching"] else None
            self._ready = True
            self._engine_ready.set()
        elif op == "load_failed":
            self._load_error = wire.error_from_wire(message["error"])
            self._engine_ready.set()
        elif op == "closed":
            self._ready = False
        elif op == "beat":  # the engine process is alive (counted as it was read)
            pass
        else:
            log.error("engine pipe: unknown message %r ignored", op)

    def _replay(self, event: list[Any]) -> None:
        name, *args = event
        observer = self._observer
        if name == "batch_started":
            observer.batch_started(size=args[0], distinct_adapters=args[1])
        elif name == "batch_finished":
            observer.batch_finished(size=args[0], steps=args[1], generated_tokens=args[2])
        elif name == "queue_wait":
            observer.queue_wait(args[0], tenant=args[1])
        elif name == "first_token":
            observer.first_token(args[0], tenant=args[1])
        elif name == "cache_event":
            observer.cache_event(CacheEvent(args[0]))
        elif name == "adapter_loaded":
            observer.adapter_loaded(args[0])

    def _on_exit(self) -> None:
        """The pipe closed: fail whatever still waits, and say the engine is gone."""
        self._ready = False
        code = None
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self._process.wait(5)
        if not self._closing and self._load_error is None:  # a failed load said why already
            log.error("the engine process exited unexpectedly (exit code %s)", code)
        if not self._engine_ready.is_set():
            self._load_error = self._load_error or EngineNotReadyError(
                f"the engine process exited while loading the model (exit code {code})")
            self._engine_ready.set()
        with self._pending_lock:
            pending, self._pending, self._by_request = list(self._pending.values()), {}, {}
        for p in pending:
            p.deliver(EngineNotReadyError(
                f"the engine process exited (exit code {code}) before this request finished"))
        self._exited.set()

    # ---- model --------------------------------------------------------------------------------

    def _require_loaded(self) -> None:
        if self._info is None or self._tokenizer is None:
            raise EngineNotReadyError(
                "the model is still loading" if self._load_error is None
                else f"the model failed to load: {self._load_error}")

    def _require(self) -> None:
        """For new work: refused while loading, once shutdown began, or the process died."""
        self._require_loaded()
        if self._closing or self._exited.is_set():
            raise EngineNotReadyError("the engine is shutting down" if self._closing
                                      else "the engine process has exited")

    @property
    def model_info(self) -> ModelInfo:
        self._require_loaded()
        assert self._info is not None
        return self._info

    def _loaded_tokenizer(self) -> Any:
        self._require_loaded()
        return self._tokenizer

    def _chat_model_name(self) -> str:
        return self.settings.model

    # ---- generation ---------------------------------------------------------------------------

    def _submit(self, request: GenerationRequest, pending: Pending, *, stream: bool) -> str:
        self._require()
        key = str(next(self._keys))
        message = wire.dumps([{"op": "submit", "key": key, "stream": stream,
                               "weight": float(self._weight_of(request.namespace)),
                               "request": wire.request_to_wire(request)}])
        pending.request_id = request.request_id
        self._post(key, pending, message)
        return key

    def _post(self, key: str, pending: Pending, message: bytes) -> None:
        """Register `pending` under `key`, then send `message`, whose answers it awaits."""
        with self._pending_lock:
            if pending.request_id is not None:
                if pending.request_id in self._by_request:
                    raise InvalidRequestError(
                        f"request id {pending.request_id!r} is already in flight")
                self._by_request[pending.request_id] = key
            if not self._pending:  # work begins to wait: silence before it was no stall
                self._heartbeat.beat()
            self._pending[key] = pending
        try:
            self._send_bytes(message)
        except OSError as e:
            self._forget(key)
            raise EngineNotReadyError(f"the engine process is gone: {e}") from e

    async def open_deltas(self, request: GenerationRequest, *, stream: bool) -> RemoteDeltas:
        """Sends the request down the pipe and waits for the engine process to accept it, so
        404/422/429/503 raise here."""
        loop = asyncio.get_running_loop()
        pending = Pending(loop, queue=asyncio.Queue())
        key = self._submit(request, pending, stream=stream)
        assert pending.queue is not None
        deltas = RemoteDeltas(pending.queue, lambda: self._abort_key(key))
        await deltas.accepted()  # cancelled meanwhile: the stream aborts itself
        return deltas

    async def abort(self, request_id: str) -> None:
        """Stop the request: its generate raises CancelledError (its stream ends with it), as
        in process, and the engine process drops its row."""
        with self._pending_lock:
            key = self._by_request.get(request_id)
        if key is not None:
            self._abort_key(key, {"op": "cancelled", "key": key})

    def _abort_key(self, key: str, notify: dict[str, Any] | None = None) -> None:
        with self._pending_lock:
            pending = self._pop(key)
        if pending is None:  # finished (or aborted) already
            return
        if notify is not None:
            pending.deliver(notify)
        with contextlib.suppress(OSError):  # the process is gone: nothing runs there
            self._send({"op": "abort", "key": key})

    def _forget(self, key: str) -> None:
        with self._pending_lock:
            self._pop(key)

    def _pop(self, key: str) -> Pending | None:
        """Under _pending_lock: the key's waiter, no longer waiting."""
        pending = self._pending.pop(key, None)
        if pending is not None and pending.request_id is not None:
            self._by_request.pop(pending.request_id, None)
        return pending

    # ---- adapters -----------------------------------------------------------------------------

    async def _call(self, method: str, **args: Any) -> Any:
        """An adapter operation, run by the engine process (which owns the prompt cache that
        uploads and deletes must invalidate)."""
        self._require()
        loop = asyncio.get_running_loop()
        pending = Pending(loop, future=loop.create_future())
        key = str(next(self._keys))
        self._post(key, pending, wire.dumps([{"op": "call", "key": key, "method": method,
                                               "args": args}]))
        assert pending.future is not None
        return (await pending.future)["value"]

    async def add_adapter(self, namespace: str, adapter_id: str, upload: AdapterUpload, *,
                          overwrite: bool = False) -> AdapterRecord:
        return wire.record_from_wire(await self._call(
            "add_adapter", namespace=namespace, adapter_id=adapter_id,
            upload=wire.upload_to_wire(upload), overwrite=overwrite))

    async def get_adapter(self, namespace: str, adapter_id: str) -> AdapterRecord:
        return wire.record_from_wire(await self._call(
            "get_adapter", namespace=namespace, adapter_id=adapter_id))

    async def list_adapters(self, namespace: str | None) -> list[AdapterRecord]:
        return [wire.record_from_wire(r)
                for r in await self._call("list_adapters", namespace=namespace)]

    async def delete_adapter(self, namespace: str, adapter_id: str) -> None:
        await self._call("delete_adapter", namespace=namespace, adapter_id=adapter_id)

    # ---- gauges -------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def tenant_stats(self) -> dict[str, dict[str, int]]:
        return dict(self._tenants)
