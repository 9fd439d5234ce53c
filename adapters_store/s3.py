"""S3AdapterStore: adapters in an S3-compatible bucket, shared by many replicas.

Layout under ``<prefix>/``::

    objects/<namespace>/<adapter_id>/<version>/embeddings.safetensors   immutable
    objects/<namespace>/<adapter_id>/<version>/adapter_config.json      immutable
    objects/<namespace>/<adapter_id>/<version>/record.json              immutable
    adapters/<namespace>/<adapter_id>.json     the pointer: {"version": ..., "record": {...}}

A put writes a complete version first (unreferenced until published), then publishes it with
one PUT of the pointer. S3 writes of one object are atomic and read-after-write consistent, so
readers see the old pointer or the new one, and a pointer only ever names a complete version: an
acknowledged upload is never lost or seen half-written, and a writer that dies before the
pointer leaves only unreferenced objects. Create-only is a conditional PUT (``If-None-Match:
*``), an overwrite is conditional on the pointer it replaces (``If-Match: <etag>``), so two
replicas racing on one id cannot both win and the old version is collected by exactly one.

The record travels inside the pointer, so get_record (the per-request 404/version check) costs
one GET. ``record_ttl_s`` lets a replica reuse a record it read for that long: that is the
bound within which it sees another replica's upload, overwrite or delete (its own writes are
seen at once). boto3 is imported here only, lazily, so the package does not need it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from adapters_store import stored_form
from adapters_store.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    InvalidAdapterIdError,
    StoreUnavailableError,
)
from adapters_store.records import AdapterRecord, ParsedAdapter, StoredAdapter, validate_adapter_id
from adapters_store.stored_form import CONFIG_FILE, EMBEDDINGS_FILE, RECORD_FILE

log = logging.getLogger(__name__)

_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_PUBLISH_RETRIES = 5
_READ_RETRIES = 5


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    return bucket, prefix.strip("/")


def _default_client() -> Any:
    """Endpoint, region and credentials from the usual AWS_* variables and files."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(connect_timeout=3, read_timeout=20,
                                            retries={"max_attempts": 3, "mode": "standard"}))


class S3AdapterStore:
    """AdapterStore on S3 (or anything speaking its protocol); thread-safe."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None,
                 record_ttl_s: float = 0.0, list_page_size: int = 1000) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client if client is not None else _default_client()
        from botocore.exceptions import BotoCoreError, ClientError

        self._client_error, self._boto_error = ClientError, BotoCoreError
        self.record_ttl_s = record_ttl_s
        self.list_page_size = list_page_size  # S3's maximum; tests page with fewer
        self._records: dict[tuple[str, str], tuple[float, AdapterRecord | None]] = {}
        self._records_lock = threading.Lock()

    # ---- keys and errors --------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _pointer_key(self, namespace: str, adapter_id: str) -> str:
        validate_adapter_id(namespace, what="namespace")
        validate_adapter_id(adapter_id)
        return self._key("adapters", namespace, f"{adapter_id}.json")

    def _version_key(self, namespace: str, adapter_id: str, version: str, name: str) -> str:
        return self._key("objects", namespace, adapter_id, version, name)

    def _code(self, e: Exception) -> str:
        if isinstance(e, self._client_error):
            return str(e.response.get("Error", {}).get("Code", ""))
        return ""

    def _unavailable(self, what: str, e: Exception) -> StoreUnavailableError:
        return StoreUnavailableError(f"s3://{self.bucket}/{self.prefix}: could not {what}: {e}")

    @staticmethod
    def _not_found(namespace: str, adapter_id: str) -> AdapterNotFoundError:
        return AdapterNotFoundError(f"no adapter {adapter_id!r} in namespace {namespace!r}")

    def _get_bytes(self, key: str) -> tuple[bytes, str] | None:
        """(body, etag), or None when the object does not exist."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read(), response["ETag"]
        except (self._client_error, self._boto_error) as e:
            if self._code(e) in _NOT_FOUND_CODES:
                return None
            raise self._unavailable(f"read {key}", e) from e

    def _put_bytes(self, key: str, data: bytes, **conditions: str) -> None:
        self._client.put_object(Bucket=self.bucket, Key=key, Body=data, **conditions)

    # ---- the pointer ------------------------------------------------------------------------

    def _pointer(self, namespace: str, adapter_id: str) -> tuple[dict, str] | None:
        got = self._get_bytes(self._pointer_key(namespace, adapter_id))
        return None if got is None else (json.loads(got[0]), got[1])

    def _remember(self, namespace: str, adapter_id: str, record: AdapterRecord | None) -> None:
        with self._records_lock:
            self._records[(namespace, adapter_id)] = (time.monotonic(), record)

    # ---- writing ----------------------------------------------------------------------------

    def put(self, namespace: str, adapter_id: str, adapter: ParsedAdapter, *,
            overwrite: bool = False) -> AdapterRecord:
        """Store atomically; AdapterExistsError if the id exists and overwrite is False."""
        pointer_key = self._pointer_key(namespace, adapter_id)
        data, record = stored_form.encode(namespace, adapter_id, adapter)
        version = uuid.uuid4().hex
        pointer = json.dumps({"version": version, "record": record.to_dict()}).encode()
        try:
            self._write_version(namespace, adapter_id, version, data, adapter.config_bytes,
                                record)
            replaced = self._publish(pointer_key, pointer, adapter_id, namespace,
                                     overwrite=overwrite)
        except (AdapterExistsError, StoreUnavailableError):
            self._remove_version(namespace, adapter_id, version)
            raise
        except (self._client_error, self._boto_error) as e:
            self._remove_version(namespace, adapter_id, version)
            raise self._unavailable(f"store adapter {adapter_id!r}", e) from e
        self._remember(namespace, adapter_id, record)
        if replaced is not None and replaced != version:
            self._remove_version(namespace, adapter_id, replaced)
        return record

    def _write_version(self, namespace: str, adapter_id: str, version: str, data: bytes,
                       config: bytes, record: AdapterRecord) -> None:
        files = {EMBEDDINGS_FILE: data, CONFIG_FILE: config,
                 RECORD_FILE: json.dumps(record.to_dict()).encode()}
        for name, body in files.items():
            self._put_bytes(self._version_key(namespace, adapter_id, version, name), body)

    def _publish(self, pointer_key: str, pointer: bytes, adapter_id: str, namespace: str, *,
                 overwrite: bool) -> str | None:
        """Write the pointer conditionally; the version it replaced (None if it was absent)."""
        for _ in range(_PUBLISH_RETRIES):
            current = self._pointer(namespace, adapter_id) if overwrite else None
            try:
                if current is None:
                    self._put_bytes(pointer_key, pointer, IfNoneMatch="*")
                    return None
                self._put_bytes(pointer_key, pointer, IfMatch=current[1])
                return str(current[0].get("version"))
            except self._client_error as e:
                if self._code(e) not in _CONFLICT_CODES:
                    raise
                if not overwrite:
                    raise AdapterExistsError(
                        f"adapter {adapter_id!r} already exists in namespace {namespace!r}: "
                        "delete it first or overwrite explicitly") from None
                # another replica published between our read and write: read again
        raise StoreUnavailableError(f"could not publish adapter {adapter_id!r}: the pointer "
                                    f"kept changing ({_PUBLISH_RETRIES} tries)")

    def delete(self, namespace: str, adapter_id: str) -> None:
        """Remove the pointer (the adapter is gone), then its version objects."""
        current = self._pointer(namespace, adapter_id)
        if current is None:
            self._remember(namespace, adapter_id, None)
            raise self._not_found(namespace, adapter_id)
        try:
            self._client.delete_object(Bucket=self.bucket,
                                       Key=self._pointer_key(namespace, adapter_id))
        except (self._client_error, self._boto_error) as e:
            raise self._unavailable(f"delete adapter {adapter_id!r}", e) from e
        self._remember(namespace, adapter_id, None)
        self._remove_version(namespace, adapter_id, str(current[0].get("version")))

    def _remove_version(self, namespace: str, adapter_id: str, version: str) -> None:
        """Best effort: a leftover version is unreferenced garbage, never visible."""
        keys = [{"Key": self._version_key(namespace, adapter_id, version, name)}
                for name in (EMBEDDINGS_FILE, CONFIG_FILE, RECORD_FILE)]
        try:
            self._client.delete_objects(Bucket=self.bucket,
                                        Delete={"Objects": keys, "Quiet": True})
        except (self._client_error, self._boto_error) as e:
            log.warning("could not remove version %s of %s/%s: %s", version, namespace,
                        adapter_id, e)

    def collect_garbage(self, *, min_age_s: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Delete version objects that no pointer names, once older than min_age_s.

        They are left by a writer that died between writing a version and publishing it, or
        by a best-effort removal that failed; they are never visible, only paid for. A put in
        progress has written its version but not yet published it, so only versions whose
        newest object is older than min_age_s go. Returns the keys deleted (or, with dry_run,
        that would be). Safe to run beside serving replicas: a reader that resolved an old
        pointer re-resolves when its version disappears, as with an overwrite.
        """
        base = self._key("objects") + "/"
        versions: dict[tuple[str, str, str], list[tuple[str, datetime]]] = {}
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base,
                PaginationConfig={"PageSize": self.list_page_size})
            for page in pages:
                for obj in page.get("Contents", []):
                    parts = obj["Key"][len(base):].split("/")
                    if len(parts) == 4:
                        versions.setdefault((parts[0], parts[1], parts[2]), []).append(
                            (obj["Key"], obj["LastModified"]))
        except (self._client_error, self._boto_error) as e:
            raise self._unavailable("list version objects", e) from e
        now = datetime.now(UTC)
        current: dict[tuple[str, str], str | None] = {}
        doomed: list[str] = []
        for (namespace, adapter_id, version), objects in sorted(versions.items()):
            if (namespace, adapter_id) not in current:
                try:
                    pointer = self._pointer(namespace, adapter_id)
                except InvalidAdapterIdError:  # not a valid id: not ours to judge, leave it
                    log.warning("store gc: skipping %s/%s (not a valid id)", namespace,
                                adapter_id)
                    current[(namespace, adapter_id)] = version
                    continue
                current[(namespace, adapter_id)] = (
                    None if pointer is None else str(pointer[0].get("version")))
            if version == current[(namespace, adapter_id)]:
                continue
            newest = max(modified for _, modified in objects)
            if (now - newest).total_seconds() >= min_age_s:
                doomed.extend(key for key, _ in objects)
        if not dry_run:
            for start in range(0, len(doomed), 1000):  # DeleteObjects takes 1,000 keys
                chunk = [{"Key": key} for key in doomed[start:start + 1000]]
                try:
                    self._client.delete_objects(Bucket=self.bucket,
                                                Delete={"Objects": chunk, "Quiet": True})
                except (self._client_error, self._boto_error) as e:
                    raise self._unavailable("delete unreferenced versions", e) from e
        return doomed

    # ---- reading ----------------------------------------------------------------------------

    def get_record(self, namespace: str, adapter_id: str) -> AdapterRecord:
        """One GET, or none when this replica read it less than record_ttl_s ago."""
        cached = self.peek_record(namespace, adapter_id)
        if cached is not None:
            return cached
        current = self._pointer(namespace, adapter_id)
        record = None if current is None else AdapterRecord.from_dict(current[0]["record"])
        self._remember(namespace, adapter_id, record)
        if record is None:
            raise self._not_found(namespace, adapter_id)
        return record

    def peek_record(self, namespace: str, adapter_id: str) -> AdapterRecord | None:
        """The record read less than record_ttl_s ago (AdapterNotFoundError if it was absent
        then); None when a GET is needed."""
        if self.record_ttl_s <= 0:
            return None
        with self._records_lock:
            cached = self._records.get((namespace, adapter_id))
        if cached is None or time.monotonic() - cached[0] >= self.record_ttl_s:
            return None
        if cached[1] is None:
            raise self._not_found(namespace, adapter_id)
        return cached[1]

    def _read_version(self, namespace: str, adapter_id: str,
                      name: str) -> tuple[AdapterRecord, bytes]:
        """Resolve the pointer once and read one file of that version (retry if replaced)."""
        for _ in range(_READ_RETRIES):
            current = self._pointer(namespace, adapter_id)
            if current is None:
                break
            got = self._get_bytes(self._version_key(namespace, adapter_id,
                                                    str(current[0]["version"]), name))
            if got is not None:
                return AdapterRecord.from_dict(current[0]["record"]), got[0]
            # replaced and its old version collected meanwhile: resolve again
        raise self._not_found(namespace, adapter_id)

    def get(self, namespace: str, adapter_id: str, *, verify: bool = False) -> StoredAdapter:
        """Record and float32 embeddings; verify=True also checks the sha256."""
        record, data = self._read_version(namespace, adapter_id, EMBEDDINGS_FILE)
        return stored_form.decode(record, data, verify=verify)

    def get_config(self, namespace: str, adapter_id: str) -> bytes:
        """The adapter_config.json bytes as uploaded."""
        return self._read_version(namespace, adapter_id, CONFIG_FILE)[1]

    def exists(self, namespace: str, adapter_id: str) -> bool:
        return self._pointer(namespace, adapter_id) is not None

    def _pointer_keys(self, namespace: str | None) -> list[str]:
        base = self._key("adapters", namespace or "") + "/"
        keys: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base,
                PaginationConfig={"PageSize": self.list_page_size})
            for page in pages:
                keys.extend(obj["Key"] for obj in page.get("Contents", [])
                            if obj["Key"].endswith(".json"))
        except (self._client_error, self._boto_error) as e:
            raise self._unavailable("list adapters", e) from e
        return keys

    def count(self, namespace: str | None = None) -> int:
        """Stored adapters, from listing keys only (no per-adapter GET)."""
        if namespace is not None:
            validate_adapter_id(namespace, what="namespace")
        return len(self._pointer_keys(namespace))

    def list(self, namespace: str | None = None) -> list[AdapterRecord]:
        """Records sorted by (namespace, adapter_id); None lists every namespace."""
        if namespace is not None:
            validate_adapter_id(namespace, what="namespace")
        records = []
        for key in self._pointer_keys(namespace):
            got = self._get_bytes(key)
            if got is not None:  # deleted meanwhile otherwise
                records.append(AdapterRecord.from_dict(json.loads(got[0])["record"]))
        return sorted(records, key=lambda r: (r.namespace, r.adapter_id))

    def ping(self) -> None:
        """Raise StoreUnavailableError unless the bucket answers a listing."""
        try:
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self._key("adapters") + "/",
                                         MaxKeys=1)
        except (self._client_error, self._boto_error) as e:
            raise self._unavailable("reach the bucket", e) from e
