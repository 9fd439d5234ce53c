"""LocalAdapterStore: adapters as immutable version directories published by atomic symlinks.

Layout under ``root``::

    <namespace>/<adapter_id>  -> ../.objects/<version>   (a relative symlink)
    .objects/<version>/embeddings.safetensors             float32, key "prompt_embeddings"
    .objects/<version>/adapter_config.json                the uploaded bytes, verbatim
    .objects/<version>/record.json                        AdapterRecord.to_dict()
    .tmp/                                                 links being built, versions being removed

So ``root/<namespace>/<adapter_id>/record.json`` etc. resolve as the flat layout would. Why
symlinks: a directory cannot be renamed over a non-empty one, so an overwrite by renaming the
old directory aside leaves a moment (or, after a crash, forever) with no adapter. Here a put
writes a complete version under ``.objects`` (unreferenced until linked; files, its directory
and ``.objects`` fsynced), then publishes it with one ``os.replace`` of a symlink built in
``.tmp`` (or ``os.symlink``, which fails if the id exists, when overwrite is off: that makes
"create only" atomic across processes too), then fsyncs the namespace directory.
Readers resolve the link once and read from an immutable version, so they see the old adapter
or the new one, never a mix, and never nothing. A process killed at any point
leaves at most an unreferenced version, which the next start removes.
A replaced or deleted version is renamed into ``.tmp`` and removed by a background thread, so
put and delete do not wait for the filesystem to free blocks.
Versions and temp entries are named ``<pid>-<process token>-<uuid>``; a start removes only those
of processes that are gone (another store on the same root, in this process or another live
one, keeps its work in progress).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path

from adapters_store import stored_form
from adapters_store.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    StoreUnavailableError,
)
from adapters_store.records import AdapterRecord, ParsedAdapter, StoredAdapter, validate_adapter_id
from adapters_store.stored_form import CONFIG_FILE, EMBEDDINGS_FILE, RECORD_FILE

log = logging.getLogger(__name__)

_OBJECTS, _TMP = ".objects", ".tmp"
_READ_RETRIES = 20
_PROCESS_TOKEN = uuid.uuid4().hex[:12]  # tells this process from an earlier one with its pid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    _write_files({path: data})


def _write_files(files: dict[Path, bytes]) -> None:
    """Create and write every file first, then fsync them all.

    The first fsync commits the journal with all the creations at once; the later ones then
    only flush data. Fsyncing each file right after writing it costs one commit per file.
    """
    handles = []
    try:
        for path, data in files.items():
            handles.append(f := open(path, "xb"))  # noqa: SIM115 - closed below
            f.write(data)
            f.flush()
        for f in handles:
            os.fsync(f.fileno())
    finally:
        for f in handles:
            f.close()


def _owner_gone(name: str) -> bool:
    """Whether the process that created a .tmp/.objects entry has exited."""
    pid, _, rest = name.partition("-")
    if not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return not rest.startswith(_PROCESS_TOKEN)  # else: an earlier process with our pid
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class LocalAdapterStore:
    """AdapterStore on a local (or any POSIX) directory; thread-safe, crash-safe."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._objects, self._tmp = self.root / _OBJECTS, self.root / _TMP
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        try:
            for path in (self.root, self._objects, self._tmp):
                path.mkdir(parents=True, exist_ok=True)
            self._collect_garbage()
        except OSError as e:
            raise StoreUnavailableError(f"adapter store at {self.root} is not usable: {e}") from e

    # ---- paths and locks -------------------------------------------------------------------

    def _link(self, namespace: str, adapter_id: str) -> Path:
        validate_adapter_id(namespace, what="namespace")
        validate_adapter_id(adapter_id)
        return self.root / namespace / adapter_id

    def _lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _new_name(self) -> str:
        return f"{os.getpid()}-{_PROCESS_TOKEN}-{uuid.uuid4().hex}"

    def _collect_garbage(self) -> None:
        """Remove temp entries and unreferenced versions left by dead processes."""
        for entry in os.scandir(self._tmp):
            if _owner_gone(entry.name):
                self._remove(Path(entry.path))
        referenced = set()
        for ns in self._namespaces():
            for entry in os.scandir(self.root / ns):
                if entry.is_symlink():
                    referenced.add(os.path.basename(os.readlink(entry.path)))
        for entry in os.scandir(self._objects):
            if entry.name not in referenced and _owner_gone(entry.name):
                self._remove(Path(entry.path))

    def _discard(self, version: str) -> None:
        """Take a version out of .objects now; free its space in the background."""
        trash = self._tmp / f"{self._new_name()}.trash"
        try:
            os.rename(self._objects / version, trash)
        except OSError:
            return  # already gone (another writer removed it)
        threading.Thread(target=self._remove, args=(trash,), daemon=True).start()

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)

    def _namespaces(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.root)
                      if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))

    # ---- writing ---------------------------------------------------------------------------

    def put(self, namespace: str, adapter_id: str, adapter: ParsedAdapter, *,
            overwrite: bool = False) -> AdapterRecord:
        """Store atomically; AdapterExistsError if the id exists and overwrite is False."""
        link = self._link(namespace, adapter_id)
        data, record = stored_form.encode(namespace, adapter_id, adapter)
        version = self._new_name()
        try:
            self._write_version(version, data, adapter.config_bytes, record)
            with self._lock((namespace, adapter_id)):
                self._publish(link, version, overwrite=overwrite)
        except AdapterExistsError:
            self._remove(self._objects / version)
            raise
        except OSError as e:
            self._remove(self._objects / version)
            raise StoreUnavailableError(f"could not store adapter {adapter_id!r}: {e}") from e
        return record

    def _write_version(self, version: str, data: bytes, config: bytes,
                       record: AdapterRecord) -> None:
        folder = self._objects / version
        folder.mkdir()
        _write_files({folder / EMBEDDINGS_FILE: data, folder / CONFIG_FILE: config,
                      folder / RECORD_FILE: json.dumps(record.to_dict()).encode()})
        _fsync_dir(folder)
        _fsync_dir(self._objects)

    def _publish(self, link: Path, version: str, *, overwrite: bool) -> None:
        target = f"../{_OBJECTS}/{version}"
        ns_dir = link.parent
        if not ns_dir.is_dir():
            ns_dir.mkdir(exist_ok=True)
            _fsync_dir(self.root)
        old = None
        try:
            os.symlink(target, link)  # fails if the id exists: "create only" is atomic
        except FileExistsError:
            if not overwrite and link.exists():
                raise AdapterExistsError(
                    f"adapter {link.name!r} already exists in namespace {ns_dir.name!r}: "
                    "delete it first or overwrite explicitly"
                ) from None
            with contextlib.suppress(OSError):
                old = os.readlink(link)
            tmp_link = self._tmp / f"{self._new_name()}.link"
            os.symlink(target, tmp_link)
            os.replace(tmp_link, link)
        _fsync_dir(ns_dir)
        if old is not None and os.path.basename(old) != version:
            self._discard(os.path.basename(old))

    def delete(self, namespace: str, adapter_id: str) -> None:
        """Remove an adapter; AdapterNotFoundError if absent."""
        link = self._link(namespace, adapter_id)
        with self._lock((namespace, adapter_id)):
            try:
                old = os.readlink(link)
            except (FileNotFoundError, NotADirectoryError):
                raise self._not_found(namespace, adapter_id) from None
            except OSError as e:  # EINVAL: something that is not our link sits there
                raise StoreUnavailableError(f"could not delete {adapter_id!r}: {e}") from e
            try:
                os.unlink(link)
            except OSError as e:
                raise StoreUnavailableError(f"could not delete {adapter_id!r}: {e}") from e
            with contextlib.suppress(OSError):
                _fsync_dir(link.parent)
            self._discard(os.path.basename(old))

    # ---- reading ---------------------------------------------------------------------------

    @staticmethod
    def _not_found(namespace: str, adapter_id: str) -> AdapterNotFoundError:
        return AdapterNotFoundError(f"no adapter {adapter_id!r} in namespace {namespace!r}")

    def _read(self, namespace: str, adapter_id: str, names: tuple[str, ...]) -> list[bytes]:
        """Read files of one version, resolving the link once (retrying if it was replaced)."""
        link = self._link(namespace, adapter_id)
        for _ in range(_READ_RETRIES):
            try:
                version_dir = link.parent / os.readlink(link)
                out = []
                for name in names:
                    with open(version_dir / name, "rb") as f:
                        out.append(f.read())
                return out
            except FileNotFoundError:
                continue  # absent, or replaced and its old version removed meanwhile: retry
            except OSError as e:
                if not os.path.lexists(link):
                    break
                raise StoreUnavailableError(f"could not read adapter {adapter_id!r}: {e}") from e
        raise self._not_found(namespace, adapter_id)

    def get_record(self, namespace: str, adapter_id: str) -> AdapterRecord:
        (raw,) = self._read(namespace, adapter_id, (RECORD_FILE,))
        return AdapterRecord.from_dict(json.loads(raw))

    def peek_record(self, namespace: str, adapter_id: str) -> AdapterRecord | None:
        """Always answers: a local record is one small file read (page cache), no network."""
        return self.get_record(namespace, adapter_id)

    def get(self, namespace: str, adapter_id: str, *, verify: bool = False) -> StoredAdapter:
        """Record and float32 embeddings; verify=True also checks the sha256 (costs a hash)."""
        raw, data = self._read(namespace, adapter_id, (RECORD_FILE, EMBEDDINGS_FILE))
        return stored_form.decode(AdapterRecord.from_dict(json.loads(raw)), data, verify=verify)

    def get_config(self, namespace: str, adapter_id: str) -> bytes:
        """The adapter_config.json bytes as uploaded."""
        (raw,) = self._read(namespace, adapter_id, (CONFIG_FILE,))
        return raw

    def exists(self, namespace: str, adapter_id: str) -> bool:
        return os.path.exists(self._link(namespace, adapter_id))

    def count(self, namespace: str | None = None) -> int:
        """Stored adapters, from the links alone (no record read): cheap enough to poll."""
        if namespace is not None:
            validate_adapter_id(namespace, what="namespace")
        try:
            total = 0
            for ns in self._namespaces() if namespace is None else [namespace]:
                try:
                    total += sum(1 for e in os.scandir(os.path.join(self.root, ns))
                                 if e.is_symlink() and not e.name.startswith("."))
                except FileNotFoundError:
                    continue
            return total
        except OSError as e:
            raise StoreUnavailableError(f"could not count adapters in {self.root}: {e}") from e

    def list(self, namespace: str | None = None) -> list[AdapterRecord]:
        """Records sorted by (namespace, adapter_id); None lists every namespace."""
        if namespace is not None:
            validate_adapter_id(namespace, what="namespace")
        try:
            namespaces = self._namespaces() if namespace is None else [namespace]
            records = []
            for ns in namespaces:
                ns_dir = os.path.join(self.root, ns)
                try:
                    names = sorted(e.name for e in os.scandir(ns_dir)
                                   if e.is_symlink() and not e.name.startswith("."))
                except FileNotFoundError:
                    continue
                for name in names:
                    try:
                        with open(os.path.join(ns_dir, name, RECORD_FILE), "rb") as f:
                            records.append(AdapterRecord.from_dict(json.loads(f.read())))
                    except FileNotFoundError:
                        continue  # deleted meanwhile
            return records
        except OSError as e:
            raise StoreUnavailableError(f"could not list adapters in {self.root}: {e}") from e

    def ping(self) -> None:
        """Raise StoreUnavailableError unless the root can be listed, written and cleaned."""
        probe = self._tmp / f"{self._new_name()}.ping"
        try:
            os.listdir(self.root)
            _write_file(probe, b"ok")
            probe.unlink()
        except OSError as e:
            raise StoreUnavailableError(f"adapter store at {self.root} is unavailable: {e}") from e
