"""The engine process (--engine-process): the model, the scheduler and the store behind a pipe.

The HTTP process's Python work (FastAPI, pydantic, tokenizing, writing responses) and the
decode loop's Python work (module calls, sampling, bookkeeping) otherwise take turns on one
GIL: over HTTP the fairness benchmark's engine iterations took twice as long as in process.
Here the engine has an interpreter of its own. Its event loop does nothing but pass messages:
requests in; token-id deltas, metric events and gauges out (server.engine.wire). Text is made
in the HTTP process (server.engine.output_processor), which also finds stop strings and sends
the abort back.

The process ignores SIGINT and SIGTERM: the HTTP process drains it through the pipe, and a
Ctrl-C sent to the whole process group must not kill in-flight requests before that drain.
When the pipe closes (the HTTP process died), it aborts what is running and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from server.config import Settings
from server.engine import wire
from server.engine.engine import Engine
from server.engine.interface import GenerationRequest
from server.engine.stores import open_store
from server.heap import cap_malloc_arenas, freeze_startup_heap

log = logging.getLogger(__name__)

STATS_PERIOD_S = 0.25  # how stale /metrics gauges may be in the HTTP process
# How stale /readyz may be: readiness pings the store, which for S3 is a LIST request, so not
# at every report (probes come every few seconds anyway).
READY_PERIOD_S = 2.0


class ForwardingObserver:
    """Engine events, queued from the engine thread and sent with the next batch of messages
    (always before the results they precede, so a scrape after a response counts it). The
    first event of a burst wakes the loop to send them, so a step that answers nobody is
    counted as promptly as one that does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[list[Any]] = []
        self.wake: Callable[[], None] = lambda: None

    def take(self) -> list[list[Any]]:
        with self._lock:
            events, self._events = self._events, []
        return events

    def _add(self, *event: Any) -> None:
        with self._lock:
            self._events.append(list(event))
            if len(self._events) > 1:
                return  # a wake-up is on its way
        self.wake()

    def batch_started(self, *, size: int, distinct_adapters: int) -> None:
        self._add("batch_started", size, distinct_adapters)

    def batch_finished(self, *, size: int, steps: int, generated_tokens: int) -> None:
        self._add("batch_finished", size, steps, generated_tokens)

    def queue_wait(self, seconds: float, *, tenant: str) -> None:
        self._add("queue_wait", seconds, tenant)

    def first_token(self, seconds: float, *, tenant: str) -> None:
        self._add("first_token", seconds, tenant)

    def cache_event(self, event: Any) -> None:
        self._add("cache_event", str(event))

    def adapter_loaded(self, seconds: float) -> None:
        self._add("adapter_loaded", seconds)


class Worker:
    """Serves one pipe until told to shut down or until the pipe closes."""

    def __init__(self, conn: Connection, settings: Settings) -> None:
        self.conn = conn
        self.events = ForwardingObserver()
        self.engine = Engine(settings, open_store(settings.store,
                                                  refresh_s=settings.store_refresh_s),
                             observer=self.events)
        self.weights: dict[str, float] = {}  # tenant -> weight, as of its latest request
        self.engine.set_tenant_weights(lambda tenant: self.weights.get(tenant, 1.0))
        self.tasks: dict[str, asyncio.Task] = {}  # pipe key -> its request's task
        self.background: set[asyncio.Task] = set()
        self.outbox: list[dict[str, Any]] = []
        self.done = asyncio.Event()
        self.shutting_down = False
        self.ready = False  # the last readiness check...
        self.ready_at: float | None = None  # ...and when it was made (monotonic)

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.conn.fileno(), self._on_readable)
        self.events.wake = self._wake
        self.engine.start()
        try:
            await asyncio.to_thread(self.engine.wait_until_ready)
        except Exception as e:  # noqa: BLE001 - reported to the HTTP process, which exits
            self.send({"op": "load_failed", "error": wire.error_to_wire(e)})
            self._flush()
            return
        await asyncio.to_thread(freeze_startup_heap)  # the engine thread's steps, unstalled
        batching = self.engine.batching
        self.send({"op": "ready", "info": wire.info_to_wire(self.engine.model_info),
                   "batching": str(batching) if batching is not None else None})
        ticker, beats = asyncio.create_task(self._tick()), asyncio.create_task(self._beat())
        await self.done.wait()
        ticker.cancel()
        beats.cancel()
        self._flush()

    # ---- out ----------------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """Queued and written once per loop pass: a step's worth goes in as few writes as
        server.engine.wire.frames allows."""
        self.outbox.append(message)
        if len(self.outbox) == 1:
            self.loop.call_soon(self._flush)

    def _wake(self) -> None:
        """From the engine thread: send the events queued so far."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: the process is ending
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        events = self.events.take()
        messages, self.outbox = self.outbox, []
        if events:
            messages.insert(0, {"op": "events", "events": events})
        if not messages:
            return
        try:
            for frame in wire.frames(messages):  # the reader decodes each in one short hold
                self.conn.send_bytes(frame)
        except OSError:  # the HTTP process is gone
            self._lost()

    async def _tick(self) -> None:
        while True:
            snapshot = await asyncio.to_thread(self._snapshot)  # is_ready may ping S3
            self.send(snapshot)
            await asyncio.sleep(STATS_PERIOD_S)

    async def _beat(self) -> None:
        """This process's sign of life for the HTTP process's readiness (server.engine.
        remote), straight from this loop: the gauges' report waits on a readiness check that
        may ping a slow store, which must not make this process look stopped."""
        while True:
            self.send({"op": "beat"})
            await asyncio.sleep(STATS_PERIOD_S)

    def _snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        if self.ready_at is None or now - self.ready_at >= READY_PERIOD_S:
            self.ready, self.ready_at = self.engine.is_ready(), now
        return {"op": "stats", "stats": self.engine.stats(),
                "tenants": self.engine.tenant_stats(), "ready": self.ready}

    # ---- in -----------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            while self.conn.poll():
                for message in wire.loads(self.conn.recv_bytes()):
                    self._dispatch(message)
        except (EOFError, OSError):
            self._lost()

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "submit":
            key = message["key"]
            request = wire.request_from_wire(message["request"])
            self.weights[request.namespace] = float(message.get("weight", 1.0))
            self.tasks[key] = asyncio.create_task(self._generate(key, request,
                                                                 message["stream"]))
        elif op == "abort":
            task = self.tasks.get(message["key"])
            if task is not None:
                task.cancel()
        elif op == "call":
            self._keep(asyncio.create_task(self._call(message["key"], message["method"],
                                                      message["args"])))
        elif op == "drain":
            self.engine.begin_drain()
        elif op == "shutdown":
            self._keep(asyncio.create_task(self._shutdown(float(message["timeout"]))))
        else:
            log.error("engine process: unknown message %r ignored", op)

    async def _generate(self, key: str, request: GenerationRequest, stream: bool) -> None:
        """Token ids only: the HTTP process's frontend decodes them, looks for stop strings
        and aborts the row when one completes (server.engine.output_processor)."""
        try:
            deltas = await self.engine.open_deltas(request, stream=stream)
            try:
                self.send({"op": "accepted", "key": key, "prompt_tokens": deltas.prompt_tokens,
                           "virtual_tokens": deltas.virtual_tokens})
                async for delta in deltas:
                    self.send({"op": "delta", "key": key, "delta": wire.delta_to_wire(delta)})
            finally:
                deltas.close()
        except asyncio.CancelledError:
            self.send({"op": "cancelled", "key": key})
        except Exception as e:  # noqa: BLE001 - every failure goes back to its request
            self.send({"op": "error", "key": key, "error": wire.error_to_wire(e)})
        finally:
            self.tasks.pop(key, None)

    def _keep(self, task: asyncio.Task) -> None:
        """The loop holds tasks weakly: keep calls and the shutdown alive until done."""
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _call(self, key: str, method: str, args: dict[str, Any]) -> None:
        try:
            value = await self._adapters(method, args)
        except Exception as e:  # noqa: BLE001 - goes back to the caller
            self.send({"op": "reply", "key": key, "error": wire.error_to_wire(e)})
        else:
            self.send({"op": "reply", "key": key, "value": value})

    async def _adapters(self, method: str, args: dict[str, Any]) -> Any:
        engine = self.engine
        if method == "add_adapter":
            record = await engine.add_adapter(args["namespace"], args["adapter_id"],
                                              wire.upload_from_wire(args["upload"]),
                                              overwrite=bool(args["overwrite"]))
            return record.to_dict()
        if method == "get_adapter":
            return (await engine.get_adapter(args["namespace"], args["adapter_id"])).to_dict()
        if method == "list_adapters":
            return [r.to_dict() for r in await engine.list_adapters(args["namespace"])]
        if method == "delete_adapter":
            await engine.delete_adapter(args["namespace"], args["adapter_id"])
            return None
        raise ValueError(f"unknown engine call {method!r}")

    # ---- the end ------------------------------------------------------------------------------

    async def _shutdown(self, timeout: float) -> None:
        """Finish (or, past `timeout`, abort) what is running, deliver it, then say so."""
        if self.shutting_down:
            return
        self.shutting_down = True
        await asyncio.to_thread(self.engine.shutdown, timeout)
        if self.tasks:  # their last messages are on the loop's mailbox now
            await asyncio.wait(list(self.tasks.values()), timeout=5)
        self.send({"op": "closed"})
        self._flush()
        self.done.set()

    def _lost(self) -> None:
        """The HTTP process is gone: nobody can receive results, so stop at once."""
        self.loop.remove_reader(self.conn.fileno())
        if not self.shutting_down:
            self.shutting_down = True
            log.error("engine process: the HTTP process went away; aborting and exiting")
            threading.Thread(target=self.engine.shutdown, args=(0.0,), daemon=True).start()
        self.done.set()


def run_worker(conn: Connection, settings_data: dict[str, Any]) -> None:
    """Serve `conn` with an engine built from `settings_data` until shutdown or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings = Settings(**settings_data)
    logging.basicConfig(level=str(settings.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s [engine process]: "
                               "%(message)s")
    cap_malloc_arenas()  # before the engine's threads allocate (server.heap says why)
    asyncio.run(Worker(conn, settings).run())


def main(argv: list[str]) -> None:
    """`python -m server.engine.worker FD SETTINGS_JSON`: FD is this end of a socket pair the
    HTTP process made (server.engine.remote); the settings are the server's, as JSON."""
    fd, settings_json = int(argv[0]), argv[1]
    run_worker(Connection(fd), json.loads(settings_json))


if __name__ == "__main__":
    main(sys.argv[1:])
