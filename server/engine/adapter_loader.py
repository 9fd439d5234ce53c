"""Cold adapters: a small thread pool reads them from the store into the prompt table.

A request whose adapter is resident is ready at once. One that misses waits while a loader
thread reads the adapter and converts it, so a cold adapter never holds up anyone else's
batch, and requests of the same adapter version that arrive meanwhile share that one load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from adapters_store.errors import AdapterStoreError
from adapters_store.store import AdapterStore
from server.engine.errors import AdapterChangedError, GenerationError
from server.engine.observer import EngineObserver
from server.engine.prompt_table import PromptTable, TableEntry, version_of
from server.engine.tickets import Ticket, TicketState

log = logging.getLogger(__name__)

LoadKey = tuple[str, str, str]  # (namespace, adapter_id, version)


class AdapterLoader:
    """Resolves a ticket's soft prompt: resident in the table, or through one load per version.

    `lock` is the scheduler's condition: `resolve` runs under it, and a finished load takes
    it to make its waiters ready (`make_ready`, called under the lock) and notifies it.
    `fail` answers a waiter whose load failed (called without the lock).
    """

    def __init__(self, *, store: AdapterStore, table: PromptTable, observer: EngineObserver,
                 lock: threading.Condition, make_ready: Callable[[Ticket], None],
                 fail: Callable[[Ticket, BaseException], None], threads: int = 2) -> None:
        self._store = store
        self._table = table
        self._observer = observer
        self._lock = lock
        self._make_ready = make_ready
        self._fail = fail
        self._loading: dict[LoadKey, list[Ticket]] = {}
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="adapter-loader")

    def resolve(self, ticket: Ticket) -> None:
        """Under the lock: ready now if resident, else wait for (or start) its load."""
        req = ticket.request
        assert req.adapter_id is not None and ticket.version is not None
        entry = self._table.lookup(req.namespace, req.adapter_id, ticket.version)
        if entry is not None:
            ticket.entry, ticket.embeds = entry, None
            self._make_ready(ticket)
            return
        key = (req.namespace, req.adapter_id, ticket.version)
        waiting = self._loading.get(key)
        if waiting is None:
            self._loading[key] = waiting = []
            self._pool.submit(self._load, key)
        waiting.append(ticket)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _load(self, key: LoadKey) -> None:
        """On a loader thread: store -> the table's rows; then release the waiters.

        If the table cannot take the rows now (the rest is pinned by running requests), the
        waiters keep the loaded tensor on the host and the step loop inserts it when one of
        them starts."""
        namespace, adapter_id, version = key
        started = time.monotonic()
        entry: TableEntry | None = None
        embeds: torch.Tensor | None = None
        error: BaseException | None = None
        try:
            stored = self._store.get(namespace, adapter_id)
            rows = stored.record.num_virtual_tokens  # seq2seq stores 2n rows; PEFT uses n
            loaded = stored.embeddings[:rows]
            entry = self._table.insert(namespace, adapter_id, version_of(stored.record),
                                       loaded, pinned=False)
            self._observer.adapter_loaded(time.monotonic() - started)
            if version_of(stored.record) == version:
                embeds = loaded if entry is None else None
            else:  # overwritten since these requests were admitted: theirs is gone
                error = AdapterChangedError(
                    f"adapter {adapter_id!r} was replaced while this request waited for it "
                    "to load; retry to use the current version")
        except AdapterStoreError as e:  # not found (deleted meanwhile), store unavailable
            error = e
        except Exception as e:  # noqa: BLE001 - a loader thread must always release waiters
            log.exception("loading adapter %s/%s failed: %s", namespace, adapter_id,
                          type(e).__name__)
            error = GenerationError(f"adapter {adapter_id!r} could not be loaded: "
                                    f"{type(e).__name__}: {e}")
        with self._lock:
            waiting = self._loading.pop(key, [])
            for ticket in waiting:
                if ticket.state is TicketState.QUEUED and error is None:
                    ticket.entry, ticket.embeds = entry, embeds
                    self._make_ready(ticket)
            self._lock.notify_all()
        if error is not None:
            for ticket in waiting:
                self._fail(ticket, _copy(error))


def _copy(error: BaseException) -> BaseException:
    """One exception instance per waiter: each is raised in its own task with its traceback."""
    try:
        return type(error)(*error.args)
    except Exception:  # noqa: BLE001 - a constructor with other arguments: share the original
        return error
