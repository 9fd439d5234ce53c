"""The storage interface every backend implements (local directory now, S3 later)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from adapters_store.records import AdapterRecord, ParsedAdapter, StoredAdapter


@runtime_checkable
class AdapterStore(Protocol):
    """Adapters keyed by (namespace, adapter_id). Implementations must be thread-safe.

    put is atomic: readers see the old adapter or the new one, never a mix; once put returns,
    the adapter survives a crash. get/get_record/delete raise AdapterNotFoundError.
    """

    def put(
        self, namespace: str, adapter_id: str, adapter: ParsedAdapter, *, overwrite: bool = False
    ) -> AdapterRecord: ...

    def get(self, namespace: str, adapter_id: str) -> StoredAdapter: ...

    def get_record(self, namespace: str, adapter_id: str) -> AdapterRecord: ...

    def peek_record(self, namespace: str, adapter_id: str) -> AdapterRecord | None:
        """The record if it can be had without network I/O, else None (then call get_record,
        off the event loop). Raises AdapterNotFoundError when the id is known not to exist.
        Lets the server resolve most requests without a thread hop or a blocking GET."""
        ...

    def list(self, namespace: str | None = None) -> list[AdapterRecord]:
        """Records sorted by (namespace, adapter_id); None lists every namespace."""
        ...

    def delete(self, namespace: str, adapter_id: str) -> None: ...

    def exists(self, namespace: str, adapter_id: str) -> bool: ...

    def ping(self) -> None:
        """Raise StoreUnavailableError when the storage cannot be read and written."""
        ...
